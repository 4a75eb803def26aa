//! End to end: real S3 events from moto, the compiled aggregator and refresher under
//! the Lambda Runtime API, DynamoDB and SQS on moto, and the Storage Gateway stand-in.
//!
//! Every test owns its table, queues, buckets and stand-in, so they run in parallel
//! against one moto server.

use integration_tests::aws::BoxError;
use integration_tests::runtime_api::{Invocation, LambdaProcess, LambdaSpawn};
use integration_tests::sgw_standin::{InjectedFailure, ShareKind};
use integration_tests::stack::{binary, Stack, StackOptions};
use serde_json::{json, Value};
use shared::s3_event::decode_notification;
use std::time::Duration;

fn s3_arn(bucket: &str, prefix: &str) -> String {
    format!(
        "arn:aws:s3:::{bucket}{}",
        if prefix.is_empty() {
            String::new()
        } else {
            format!("/{prefix}")
        }
    )
}

/// Puts `keys` into `bucket` and returns moto's notifications for them (the bucket's
/// `s3:TestEvent` from its notification set-up is collected too, and returned first).
async fn put_and_collect(
    stack: &Stack,
    bucket: &str,
    keys: &[String],
) -> Result<Vec<Value>, BoxError> {
    for key in keys {
        stack.clients.put_object(bucket, key).await?;
    }
    stack.collect_s3_events(keys.len() + 1).await
}

fn sorted_refreshed_shares(stack: &Stack) -> Vec<String> {
    let mut arns: Vec<String> = stack
        .gateway
        .refreshes()
        .into_iter()
        .map(|r| r.share_arn)
        .collect();
    arns.sort();
    arns
}

#[tokio::test]
async fn burst_of_200_events_gives_one_message_and_one_refresh_per_share() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 20,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("burst").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let root = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let data = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, "data/"));
    let keys: Vec<String> = (0..200)
        .map(|i| format!("data/batch-{}/object-{i}.bin", i % 7))
        .collect();
    let events = put_and_collect(&stack, &bucket, &keys).await?;
    assert_eq!(events.len(), 201);

    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("windowsOpened"), 1);
    assert_eq!(feed.total("windowsJoined"), 199);
    assert_eq!(feed.total("messagesSent"), 1);
    assert_eq!(feed.total("skippedTestEvents"), 1);

    let (visible, delayed) = stack.clients.queue_depth(&stack.action_queue_url).await?;
    assert_eq!(
        visible + delayed,
        1,
        "exactly one refresh message is queued"
    );
    let item = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .ok_or("no window item")?;
    assert_eq!(item["Generation"].as_n().map_err(|_| "Generation")?, "1");
    assert_eq!(item["Folders"].as_ss().map_err(|_| "Folders")?.len(), 7);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.messages, 1);
    assert_eq!(run.batch_item_failures, 0);
    let mut expected = vec![root, data];
    expected.sort();
    assert_eq!(sorted_refreshed_shares(&stack), expected);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 2);
    assert!(stack.aggregator.output_contains(&format!(
        "Refresh for bucket: {bucket} within refresh window, skipping"
    )));
    assert!(stack
        .aggregator
        .output_contains(&format!("Sending refresh request for bucket: {bucket}")));
    Ok(())
}

#[tokio::test]
async fn three_buckets_give_three_messages_and_three_refreshes() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 8,
        ..Default::default()
    })
    .await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let mut shares = Vec::new();
    let mut events = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let bucket = stack.create_bucket(name).await?;
        shares.push(
            stack
                .gateway
                .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "")),
        );
        let keys: Vec<String> = (0..10).map(|i| format!("{name}/k{i}")).collect();
        events.extend(put_and_collect(&stack, &bucket, &keys).await?);
    }
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("windowsOpened"), 3);
    assert_eq!(feed.total("messagesSent"), 3);
    let run = stack.run_refresher(3, stack.window_wait()).await?;
    assert_eq!(run.messages, 3);
    shares.sort();
    assert_eq!(sorted_refreshed_shares(&stack), shares);
    Ok(())
}

#[tokio::test]
async fn an_event_after_the_window_closes_opens_a_new_window() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("late").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));

    let first = put_and_collect(&stack, &bucket, &["one".to_string()]).await?;
    let feed = stack.invoke_aggregator(&first).await?;
    assert_eq!(feed.total("windowsOpened"), 1);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.messages, 1);

    // The window has ended and its refresh ran: the next event needs a new refresh.
    stack.clients.put_object(&bucket, "two").await?;
    let second = stack.collect_s3_events(1).await?;
    let feed = stack.invoke_aggregator(&second).await?;
    assert_eq!(feed.total("windowsOpened"), 1);
    assert_eq!(feed.total("windowsJoined"), 0);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.messages, 1);

    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 2);
    assert!(refreshes.iter().all(|r| r.share_arn == share));
    let item = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .ok_or("no window item")?;
    assert_eq!(item["Generation"].as_n().map_err(|_| "Generation")?, "2");
    assert_eq!(
        item["RefreshedGeneration"]
            .as_n()
            .map_err(|_| "RefreshedGeneration")?,
        "2"
    );
    Ok(())
}

#[tokio::test]
async fn a_gateway_write_opens_one_window_and_a_test_event_nothing() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    let bucket = stack.create_bucket("quiet").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let mut events = put_and_collect(&stack, &bucket, &["written-by-gateway".to_string()]).await?;
    // moto sends no userIdentity; give the real event the gateway's principal.
    let object_event = events
        .iter_mut()
        .find(|e| e.get("Records").is_some())
        .ok_or("no object event")?;
    let gateway_id = gw.rsplit('/').next().ok_or("no gateway id")?;
    object_event["Records"][0]["userIdentity"] =
        json!({"principalId": format!("AWS:AROAEXAMPLE:StorageGateway-{gateway_id}")});
    assert!(events.iter().any(|e| e["Event"] == "s3:TestEvent"));

    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("gatewayWrites"), 1);
    assert_eq!(feed.total("skippedTestEvents"), 1);
    // Other gateways' shares could need it: one window, whose refresh then finds that
    // the bucket's only share is on the writer.
    assert_eq!(feed.total("messagesSent"), 1);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 0);
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn nfs_and_smb_shares_on_two_gateways_are_both_refreshed() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    let bucket = stack.create_bucket("two-gateways").await?;
    let gw1 = stack.gateway.add_gateway("gw-1");
    let gw2 = stack.gateway.add_gateway("gw-2");
    let nfs = stack
        .gateway
        .add_share(&gw1, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let smb = stack
        .gateway
        .add_share(&gw2, ShareKind::Smb, &s3_arn(&bucket, ""));
    let other = stack.create_bucket("unrelated").await?;
    stack
        .gateway
        .add_share(&gw2, ShareKind::Nfs, &s3_arn(&other, ""));

    let events = put_and_collect(
        &stack,
        &bucket,
        &["a.txt".to_string(), "b/c.txt".to_string()],
    )
    .await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    let mut expected = vec![nfs, smb];
    expected.sort();
    assert_eq!(sorted_refreshed_shares(&stack), expected);
    assert_eq!(stack.gateway.calls_to("DescribeNFSFileShares"), 1);
    assert_eq!(stack.gateway.calls_to("DescribeSMBFileShares"), 1);
    Ok(())
}

#[tokio::test]
async fn shares_are_found_across_pages() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    let bucket = stack.create_bucket("paged").await?;
    let gateways = [
        stack.gateway.add_gateway("gw-1"),
        stack.gateway.add_gateway("gw-2"),
    ];
    let mut ours = Vec::new();
    for i in 0..130 {
        let kind = if i % 3 == 0 {
            ShareKind::Smb
        } else {
            ShareKind::Nfs
        };
        let gw = &gateways[i % 2];
        // Every 13th share maps our bucket, the rest map other buckets.
        if i % 13 == 12 {
            ours.push(stack.gateway.add_share(gw, kind, &s3_arn(&bucket, "")));
        } else {
            stack
                .gateway
                .add_share(gw, kind, &format!("arn:aws:s3:::other-bucket-{i}"));
        }
    }
    let events = put_and_collect(&stack, &bucket, &["x".to_string()]).await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    ours.sort();
    assert_eq!(ours.len(), 10);
    assert_eq!(sorted_refreshed_shares(&stack), ours);
    // 130 shares at the stand-in's 100 per page, and describes of at most 10 ARNs.
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 2);
    let (smb, nfs): (usize, usize) = (44, 86);
    assert_eq!(
        stack.gateway.calls_to("DescribeSMBFileShares"),
        smb.div_ceil(10)
    );
    assert_eq!(
        stack.gateway.calls_to("DescribeNFSFileShares"),
        nfs.div_ceil(10)
    );
    for call in stack.gateway.calls() {
        if let Some(list) = call.body.get("FileShareARNList").and_then(Value::as_array) {
            assert!(!list.is_empty() && list.len() <= 10);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_prefix_share_is_refreshed_only_for_keys_under_its_prefix() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("prefixed").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let root = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let reports = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, "reports/"));

    // Window 1: keys outside reports/ (including one that only starts with its name).
    let events = put_and_collect(
        &stack,
        &bucket,
        &["logs/app.log".to_string(), "reports-old.txt".to_string()],
    )
    .await?;
    stack.invoke_aggregator(&events).await?;
    stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(sorted_refreshed_shares(&stack), vec![root.clone()]);

    // Window 2: a key under reports/.
    stack
        .clients
        .put_object(&bucket, "reports/2026/q4.csv")
        .await?;
    let events = stack.collect_s3_events(1).await?;
    stack.invoke_aggregator(&events).await?;
    stack.run_refresher(1, stack.window_wait()).await?;
    let mut expected = vec![root.clone(), root, reports];
    expected.sort();
    assert_eq!(sorted_refreshed_shares(&stack), expected);
    Ok(())
}

#[tokio::test]
async fn moto_event_shape_is_decoded_and_normalised() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    let bucket = stack.create_bucket("shape").await?;
    let events =
        put_and_collect(&stack, &bucket, &["dir/sub/file name+x=.txt".to_string()]).await?;
    let object_event = events
        .iter()
        .find(|e| e.get("Records").is_some())
        .ok_or("no object event")?;
    // moto's differences from AWS, which the decoder must absorb.
    let record = &object_event["Records"][0];
    assert!(record.get("userIdentity").is_none());
    assert!(!record["eventTime"]
        .as_str()
        .unwrap_or_default()
        .ends_with('Z'));
    assert!(record["s3"]["object"]["key"]
        .as_str()
        .unwrap_or_default()
        .contains("%2F"));
    let decoded = decode_notification(object_event)?;
    assert_eq!(decoded.changes.len(), 1);
    assert_eq!(
        decoded.changes[0].key.as_deref(),
        Some("dir/sub/file name+x=.txt")
    );
    assert_eq!(decoded.changes[0].folder(), Some("dir/sub/"));
    assert!(decoded.changes[0].event_time_ms.is_some());
    Ok(())
}

#[tokio::test]
async fn a_throttled_refresh_is_kept_on_its_share_and_retried_by_a_wake_up() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("throttled").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    stack
        .gateway
        .fail_next("RefreshCache", 1, InjectedFailure::Throttle);

    let events = put_and_collect(&stack, &bucket, &["k".to_string()]).await?;
    stack.invoke_aggregator(&events).await?;
    let first = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(
        first.batch_item_failures, 0,
        "the change waits on its share, not in the message"
    );
    assert!(stack.gateway.refreshes().is_empty());
    let share_item = stack
        .clients
        .bucket_item(&stack.table, &format!("share#{share}"))
        .await?
        .ok_or("no share item")?;
    assert_eq!(
        share_item["Pending"].as_ss().map_err(|_| "Pending")?,
        &["/".to_string()]
    );
    let settled = stack.settle(Duration::from_secs(30)).await?;
    assert!(settled.wake_ups >= 1, "{settled:?}");
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 1);
    assert_eq!(refreshes[0].share_arn, share);
    // The throttle kept the share map: one resolution for both attempts.
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 1);
    Ok(())
}

#[tokio::test]
async fn refresher_drops_only_messages_that_can_never_work() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    stack
        .clients
        .sqs
        .send_message()
        .queue_url(&stack.action_queue_url)
        .message_body("this is not a refresh request")
        .send()
        .await?;
    let run = stack.run_refresher(1, Duration::from_secs(10)).await?;
    assert_eq!(run.messages, 1);
    assert_eq!(
        run.batch_item_failures, 0,
        "an unreadable message is not retried"
    );
    assert!(stack
        .refresher
        .output_contains("Discarding unreadable refresh message"));
    assert!(stack
        .refresher
        .output_contains("this is not a refresh request"));
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn aggregator_fails_the_invocation_when_dynamodb_fails() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        extra_env: vec![("TABLE_NAME".into(), "NoSuchTable".into())],
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("no-table").await?;
    let events = put_and_collect(&stack, &bucket, &["k".to_string()]).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert_eq!(
        feed.errors.len(),
        1,
        "the object event must fail so Lambda retries it"
    );
    assert!(
        feed.errors[0].starts_with("Aggregator.WindowStore"),
        "{:?}",
        feed.errors
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 0)
    );
    // The process stays up for the next invocation.
    let again = stack.invoke_aggregator(&events[..1]).await?;
    assert_eq!(again.responses.len(), 1);
    Ok(())
}

/// (function, environment, variable named, accepted values).
type ConfigCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str);

async fn init_failure(binary_name: &str, env: &[(&str, &str)]) -> Result<Vec<String>, BoxError> {
    let path = binary(binary_name)?;
    let mut spec = LambdaSpawn::new(&path, binary_name);
    for (k, v) in env {
        spec = spec.env(*k, *v);
    }
    let process = LambdaProcess::spawn(spec).await?;
    let outcome = process.wait_for_init_error(Duration::from_secs(10)).await?;
    assert!(
        outcome.failed(),
        "{binary_name} must fail at init with {env:?}"
    );
    Ok(outcome.output)
}

#[tokio::test]
async fn bad_configuration_stops_the_function_at_init_with_one_line() -> Result<(), BoxError> {
    let queue = (
        "QUEUE_URL",
        "https://sqs.us-east-1.amazonaws.com/123456789012/q",
    );
    // (function, environment, the variable the line must name, what it must accept)
    let cases: [ConfigCase; 4] = [
        ("aggregator", vec![], "QUEUE_URL", "required"),
        (
            "aggregator",
            vec![queue, ("REFRESH_DELAY_SECONDS", "43201")],
            "REFRESH_DELAY_SECONDS",
            "0 to 43200",
        ),
        (
            "aggregator",
            vec![queue, ("LOG_LEVEL", "chatty")],
            "LOG_LEVEL",
            "DEBUG, INFO, WARN",
        ),
        (
            "refresher",
            vec![("TABLE_NAME", "x")],
            "TABLE_NAME",
            "3 to 255",
        ),
    ];
    for (name, env, variable, accepted) in cases {
        let output = init_failure(name, &env).await?;
        let lines: Vec<&String> = output.iter().filter(|l| l.contains(variable)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{name}: one line naming {variable}: {output:?}"
        );
        assert!(lines[0].contains(accepted), "{name}: {}", lines[0]);
    }
    Ok(())
}

#[tokio::test]
async fn aggregator_rejects_a_payload_that_is_not_an_s3_event_and_stays_up() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions::default()).await?;
    for bad in [json!({}), json!({"Records": "x"}), json!([1, 2, 3])] {
        match stack.aggregator.invoke(bad).await? {
            Invocation::Error { error_type, .. } => {
                assert_eq!(error_type, "Aggregator.NotAnS3Notification")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    let ok = stack.aggregator.invoke(json!({"Records": []})).await?;
    assert!(!ok.is_error());
    Ok(())
}

#[tokio::test]
async fn logs_follow_log_level_rust_log_and_the_json_format() -> Result<(), BoxError> {
    // JSON lines at INFO.
    let json_stack = Stack::start(StackOptions {
        extra_env: vec![("AWS_LAMBDA_LOG_FORMAT".into(), "JSON".into())],
        ..Default::default()
    })
    .await?;
    let bucket = json_stack.create_bucket("json-logs").await?;
    let events = put_and_collect(&json_stack, &bucket, &["a".to_string(), "b".to_string()]).await?;
    json_stack.invoke_aggregator(&events).await?;
    let lines = json_stack.aggregator.output_lines();
    let skip = lines
        .iter()
        .find(|l| l.contains("within refresh window, skipping"))
        .ok_or("no skip line")?;
    let parsed: Value = serde_json::from_str(skip)?;
    assert_eq!(parsed["level"], "INFO");
    assert_eq!(parsed["bucket"], bucket.as_str());
    assert!(parsed["message"]
        .as_str()
        .unwrap_or_default()
        .starts_with("Refresh for bucket"));
    assert!(
        parsed["span"]["requestId"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "the request id sits in the span: {skip}"
    );

    // LOG_LEVEL=warn (any case) hides the INFO decisions; RUST_LOG overrides LOG_LEVEL.
    for (extra, expect_info) in [
        (vec![("LOG_LEVEL", "warn")], false),
        (
            vec![
                ("LOG_LEVEL", "warn"),
                ("RUST_LOG", "aggregator=info,shared=info"),
            ],
            true,
        ),
    ] {
        let stack = Stack::start(StackOptions {
            extra_env: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_level: "WARN".into(),
            ..Default::default()
        })
        .await?;
        let bucket = stack.create_bucket("levels").await?;
        let events = put_and_collect(&stack, &bucket, &["a".to_string(), "b".to_string()]).await?;
        let feed = stack.invoke_aggregator(&events).await?;
        assert_eq!(feed.total("windowsJoined"), 1);
        assert_eq!(
            stack
                .aggregator
                .output_contains("within refresh window, skipping"),
            expect_info,
            "{extra:?}"
        );
    }
    Ok(())
}

/// The EMF lines a function printed, each checked against the EMF specification.
fn emf_lines(process: &LambdaProcess) -> Vec<Value> {
    process
        .output_lines()
        .iter()
        .filter(|l| l.starts_with("{\"_aws\""))
        .map(|l| {
            shared::metrics::check_emf_line(l)
                .unwrap_or_else(|e| panic!("invalid EMF line ({e}): {l}"))
        })
        .collect()
}

/// The `Function` dimension is the function's name (`AWS_LAMBDA_FUNCTION_NAME`), as
/// the stack names its functions.
const AGGREGATOR_FUNCTION: &str = "S3EventAggregator";
const REFRESHER_FUNCTION: &str = "S3StorageGatewayRefresh";

fn metric_sum(lines: &[Value], function: &str, bucket: Option<&str>, name: &str) -> f64 {
    lines
        .iter()
        .filter(|l| l["Function"] == function && l.get("Bucket").and_then(Value::as_str) == bucket)
        .filter_map(|l| l.get(name).and_then(Value::as_f64))
        .sum()
}

#[tokio::test]
async fn a_warm_aggregator_adds_its_metrics_up_and_writes_them_when_lambda_shuts_it_down(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 60,
        extra_env: vec![("METRICS_INTERVAL_SECONDS".into(), "300".into())],
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("buffered").await?;
    let keys: Vec<String> = (0..6).map(|i| format!("d{}/k{i}", i % 3)).collect();
    let events = put_and_collect(&stack, &bucket, &keys).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    // Registered at init, before the first invocation.
    assert_eq!(
        stack.aggregator.extensions(),
        ["s3-event-aggregator-shutdown"],
        "an internal extension, so that Lambda sends SIGTERM at shutdown"
    );
    assert!(
        emf_lines(&stack.aggregator).is_empty(),
        "the invocations' metrics wait in the container"
    );
    let status = stack.aggregator.shutdown_as_lambda().await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "the shutdown hook exits cleanly: {status:?}"
    );
    let agg = emf_lines(&stack.aggregator);
    assert_eq!(
        agg.len(),
        2,
        "one function line and one bucket line: {agg:?}"
    );
    let b = Some(bucket.as_str());
    for bucket in [None, b] {
        assert_eq!(
            metric_sum(&agg, AGGREGATOR_FUNCTION, bucket, "EventsReceived"),
            6.0
        );
        assert_eq!(
            metric_sum(&agg, AGGREGATOR_FUNCTION, bucket, "WindowsOpened"),
            1.0
        );
        assert_eq!(
            metric_sum(&agg, AGGREGATOR_FUNCTION, bucket, "MessagesSent"),
            1.0
        );
    }
    Ok(())
}

#[tokio::test]
async fn metrics_are_emf_lines_and_refreshes_are_tracked_on_the_item() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 2,
        ..Default::default()
    })
    .await?;
    stack
        .clients
        .sqs
        .set_queue_attributes()
        .queue_url(&stack.action_queue_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            "1",
        )
        .send()
        .await?;
    let bucket = stack.create_bucket("metrics").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let keys: Vec<String> = (0..5).map(|i| format!("m/{i}")).collect();
    let mut events = put_and_collect(&stack, &bucket, &keys).await?;
    let gateway_write = events
        .iter()
        .position(|e| e.get("Records").is_some())
        .ok_or("no object event")?;
    events[gateway_write]["Records"][0]["userIdentity"] =
        json!({"principalId": "x:StorageGateway-sgw-1"});
    events.push(json!({"Records": [{"s3": {"bucket": {"name": bucket}}}]}));
    stack.invoke_aggregator(&events).await?;
    stack
        .gateway
        .fail_next("RefreshCache", 1, InjectedFailure::Throttle);
    let first = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(first.batch_item_failures, 0);
    // The wake-up after the throttle's back-off calls the share; its completion event
    // frees the slot.
    stack.settle(Duration::from_secs(30)).await?;

    let agg = emf_lines(&stack.aggregator);
    let b = Some(bucket.as_str());
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, None, "EventsReceived"),
        6.0
    );
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "EventsReceived"),
        6.0
    );
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "EventsFromGateway"),
        1.0
    );
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "EventsSkippedMalformed"),
        1.0
    );
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "WindowsOpened"),
        1.0
    );
    // Five changes (the gateway's write among them): one opens, four join.
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "EventsCoalesced"),
        4.0
    );
    assert_eq!(
        metric_sum(&agg, AGGREGATOR_FUNCTION, b, "MessagesSent"),
        1.0
    );
    assert!(agg
        .iter()
        .all(|l| l["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "S3EventAggregator"));

    let refresher = emf_lines(&stack.refresher);
    assert_eq!(
        metric_sum(&refresher, REFRESHER_FUNCTION, b, "RefreshesThrottled"),
        1.0
    );
    assert_eq!(
        metric_sum(&refresher, REFRESHER_FUNCTION, b, "MessagesFailed"),
        0.0
    );
    assert_eq!(
        metric_sum(&refresher, REFRESHER_FUNCTION, b, "RefreshesRequested"),
        1.0
    );
    // One after the throttle, one for the accepted call's lease end (in case its
    // completion event never came).
    assert_eq!(
        metric_sum(&refresher, REFRESHER_FUNCTION, b, "WakeUpsSent"),
        2.0
    );
    assert_eq!(
        metric_sum(&refresher, REFRESHER_FUNCTION, b, "RefreshesCompleted"),
        1.0
    );
    let age = metric_sum(&refresher, REFRESHER_FUNCTION, b, "OldestEventAgeMs");
    assert!(
        age >= 2_000.0,
        "event to RefreshCache takes at least the window: {age}"
    );
    let staleness = metric_sum(&refresher, REFRESHER_FUNCTION, b, "StalenessMs");
    assert!(
        staleness >= age,
        "the refresh completes after it starts: {staleness} < {age}"
    );
    assert!(stack
        .refresher
        .output_lines()
        .iter()
        .any(|l| l.contains("staleness_ms=") && l.contains("completed")));

    // The window is handed off on the bucket's item; the call, its notification id
    // and its completion are on the share's item.
    let item = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .ok_or("no item")?;
    assert_eq!(
        item["RefreshedGeneration"]
            .as_n()
            .map_err(|_| "RefreshedGeneration")?,
        "1"
    );
    let last = item
        .get("LastRefresh")
        .and_then(|v| v.as_m().ok())
        .ok_or("no LastRefresh")?;
    let share_item = stack
        .clients
        .bucket_item(&stack.table, &format!("share#{share}"))
        .await?
        .ok_or("no share item")?;
    let accepted = stack.gateway.refreshes();
    assert_eq!(accepted.len(), 1);
    assert_eq!(share_item["Slots"].as_l().map_err(|_| "Slots")?.len(), 0);
    assert!(!share_item.contains_key("Pending"));
    assert_eq!(
        share_item["LastStalenessMs"]
            .as_n()
            .map_err(|_| "LastStalenessMs")?,
        &(staleness as i64).to_string()
    );
    assert_eq!(last["Generation"].as_n().map_err(|_| "Generation")?, "1");
    Ok(())
}

/// A table taken over from the 2018 deployment (`create-stack.sh --migrate` keeps it)
/// holds items keyed by bucket with the 2018 attributes `timestamp` and `share`. They
/// open no window of their own: the first event opens one beside them, and it is
/// refreshed like any other.
#[tokio::test]
async fn a_2018_item_in_the_table_does_no_harm() -> Result<(), BoxError> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("y2018").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    stack
        .clients
        .dynamodb
        .put_item()
        .table_name(&stack.table)
        .item("BucketName", AttributeValue::S(bucket.clone()))
        .item("timestamp", AttributeValue::N("1534097642149".into()))
        .item("share", AttributeValue::S(share.clone()))
        .send()
        .await?;

    let events = put_and_collect(&stack, &bucket, &["after-2018/k".to_string()]).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("windowsOpened"), 1);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0));
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 1);
    assert_eq!(refreshes[0].share_arn, share);
    assert_eq!(refreshes[0].folder_list, ["/", "/after-2018"]);
    let item = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .ok_or("no item")?;
    assert_eq!(item["Generation"].as_n().map_err(|_| "Generation")?, "1");
    assert_eq!(
        item["timestamp"].as_n().map_err(|_| "timestamp")?,
        "1534097642149",
        "the 2018 attributes are left as they are"
    );
    Ok(())
}
