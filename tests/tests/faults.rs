//! Fault injection on the real stack: moto (DynamoDB, SQS, S3 with real event JSON),
//! the Storage Gateway stand-in, and the compiled `aggregator` and `refresher` run
//! under the Lambda Runtime API harness.
//!
//! Each test breaks one thing (the action queue, the gateway's throttle, its in-flight
//! limit, a 5xx, a share replaced, duplicated or late events and messages, a missing
//! table, an unreachable gateway), then checks what reached DynamoDB, SQS and the
//! stand-in: the failed step is retried (by Lambda's async retry or by SQS
//! redelivery), never dropped, and every event ends up covered by a `RefreshCache`
//! that started after it was processed.
//!
//! Not covered here: a function killed between the aggregator's window write and its
//! send. Real processes cannot be stopped between those two calls reliably; the
//! deterministic simulation in `shared/` crashes the same code at every await point.
//! The state such a crash leaves behind (a window written, its message not sent) is
//! exactly what `queue_unavailable_during_send_*` produces, and those tests show that
//! the retry, or the next event of the bucket, sends the message.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use integration_tests::aws::{lambda_aws_env, lambda_sqs_event, sdk_config, unique_name, BoxError};
use integration_tests::runtime_api::{Invocation, LambdaProcess, LambdaSpawn};
use integration_tests::sgw_standin::{InjectedFailure, RecordedCall, ShareKind};
use integration_tests::stack::{
    action_message_kind, binary, ActionMessageKind, Stack, StackOptions,
};
use serde_json::Value;
use shared::s3_event::decode_notification;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

type Item = HashMap<String, AttributeValue>;

fn s3_arn(bucket: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("arn:aws:s3:::{bucket}")
    } else {
        format!("arn:aws:s3:::{bucket}/{prefix}")
    }
}

/// A bucket whose notifications go to the stack's events queue; its `s3:TestEvent`
/// is consumed here, so later collections hold only object events.
async fn new_bucket(stack: &Stack, prefix: &str) -> Result<String, BoxError> {
    let bucket = stack.create_bucket(prefix).await?;
    let events = stack.collect_s3_events(1).await?;
    assert!(
        events.iter().all(|e| e["Event"] == "s3:TestEvent"),
        "{events:?}"
    );
    Ok(bucket)
}

/// Puts `keys` (in order) and returns moto's notification for each, in the same order.
async fn put_events(stack: &Stack, bucket: &str, keys: &[&str]) -> Result<Vec<Value>, BoxError> {
    for key in keys {
        stack.clients.put_object(bucket, key).await?;
    }
    let events = stack.collect_s3_events(keys.len()).await?;
    assert_eq!(events.len(), keys.len(), "{events:?}");
    for (event, key) in events.iter().zip(keys) {
        let decoded = decode_notification(event)?;
        assert_eq!(decoded.changes.len(), 1, "{event}");
        assert_eq!(decoded.changes[0].key.as_deref(), Some(*key), "{event}");
    }
    Ok(events)
}

/// The aggregator's report, or a test failure naming the error.
fn report(invocation: &Invocation) -> &Value {
    match invocation {
        Invocation::Response(report) => report,
        Invocation::Error {
            error_type,
            error_message,
        } => panic!("expected a report, got {error_type}: {error_message}"),
    }
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

async fn item(stack: &Stack, bucket: &str) -> Result<Item, BoxError> {
    Ok(stack
        .clients
        .bucket_item(&stack.table, bucket)
        .await?
        .ok_or_else(|| format!("no window item for {bucket}"))?)
}

/// A numeric attribute of the bucket's item; 0 when absent.
fn num(item: &Item, name: &str) -> i64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn folders(item: &Item) -> Vec<String> {
    let mut folders = item
        .get("Folders")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    folders.sort();
    folders
}

async fn set_visibility_timeout(stack: &Stack, seconds: u32) -> Result<(), BoxError> {
    stack
        .clients
        .sqs
        .set_queue_attributes()
        .queue_url(&stack.action_queue_url)
        .attributes(QueueAttributeName::VisibilityTimeout, seconds.to_string())
        .send()
        .await?;
    Ok(())
}

/// Receives from the action queue until `expected` messages arrived (no delete: each
/// stays invisible for the queue's visibility timeout, then comes back).
async fn receive_action_messages(
    stack: &Stack,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Message>, BoxError> {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    while messages.len() < expected && Instant::now() < deadline {
        for message in stack
            .clients
            .receive(&stack.action_queue_url, 10, 1)
            .await?
        {
            // Completion events and wake-ups go to the refresher, as the event source
            // mapping would hand them over; the test looks at refresh messages.
            if action_message_kind(message.body().unwrap_or_default()) == ActionMessageKind::Refresh
            {
                messages.push(message);
            } else {
                let failed =
                    invoke_refresher(stack, &stack.refresher, std::slice::from_ref(&message))
                        .await?;
                if failed.is_empty() {
                    delete_message(stack, &message).await?;
                }
            }
        }
    }
    if messages.len() < expected {
        return Err(format!(
            "expected {expected} action messages, got {}",
            messages.len()
        )
        .into());
    }
    Ok(messages)
}

async fn delete_message(stack: &Stack, message: &Message) -> Result<(), BoxError> {
    stack
        .clients
        .sqs
        .delete_message()
        .queue_url(&stack.action_queue_url)
        .receipt_handle(message.receipt_handle().ok_or("no receipt handle")?)
        .send()
        .await?;
    Ok(())
}

fn receive_count(message: &Message) -> u64 {
    message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Invokes `refresher` with `messages` as one SQS event; returns the ids reported in
/// `batchItemFailures`.
async fn invoke_refresher(
    stack: &Stack,
    refresher: &LambdaProcess,
    messages: &[Message],
) -> Result<Vec<String>, BoxError> {
    let event = lambda_sqs_event(messages, &stack.action_queue_arn);
    match refresher.invoke(event).await? {
        Invocation::Response(response) => Ok(response["batchItemFailures"]
            .as_array()
            .ok_or_else(|| format!("not a batch response: {response}"))?
            .iter()
            .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_string))
            .collect()),
        Invocation::Error {
            error_type,
            error_message,
        } => Err(format!("refresher failed: {error_type}: {error_message}").into()),
    }
}

/// The refresher as the stack starts it, but with other environment values.
async fn custom_refresher(
    stack: &Stack,
    gateway_endpoint: &str,
    table: &str,
) -> Result<LambdaProcess, BoxError> {
    let path = binary("refresher")?;
    let mut spec = LambdaSpawn::new(&path, "S3StorageGatewayRefreshBroken");
    spec.env = lambda_aws_env(stack.moto.endpoint(), gateway_endpoint);
    spec.env.push(("TABLE_NAME".into(), table.to_string()));
    spec.env.push(("LOG_LEVEL".into(), "INFO".into()));
    Ok(LambdaProcess::spawn(spec).await?)
}

fn refreshes_of(stack: &Stack, share: &str) -> usize {
    stack
        .gateway
        .refreshes()
        .iter()
        .filter(|r| r.share_arn == share)
        .count()
}

/// Every accepted refresh of `share` started after `after`.
fn all_refreshes_after(stack: &Stack, share: &str, after: SystemTime) -> bool {
    stack
        .gateway
        .refreshes()
        .iter()
        .filter(|r| r.share_arn == share)
        .all(|r| r.started_at > after)
}

async fn delete_queue(stack: &Stack, url: &str) -> Result<(), BoxError> {
    stack
        .clients
        .sqs
        .delete_queue()
        .queue_url(url)
        .send()
        .await?;
    Ok(())
}

/// Recreates the stack's action queue under its name; the URL must not change, as on
/// AWS, where a queue's URL is made of the account and the name.
async fn recreate_action_queue(stack: &Stack) -> Result<(), BoxError> {
    let name = stack
        .action_queue_url
        .rsplit('/')
        .next()
        .ok_or("queue URL without a name")?;
    let url = stack.clients.create_queue(name).await?;
    assert_eq!(
        url, stack.action_queue_url,
        "a queue recreated with the same name has the same URL"
    );
    assert_eq!(stack.clients.queue_arn(&url).await?, stack.action_queue_arn);
    Ok(())
}

// ---------------------------------------------------------------------------------
// The action queue unavailable during the aggregator's send
// ---------------------------------------------------------------------------------

/// The window is long enough that the retry still finds it open.
const LONG_WINDOW_SECONDS: u32 = 8;

#[tokio::test]
async fn queue_unavailable_during_send_leaves_no_window_and_the_retry_opens_it(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: LONG_WINDOW_SECONDS,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "queue-gone").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let event = put_events(&stack, &bucket, &["dir/a.txt"]).await?.remove(0);

    delete_queue(&stack, &stack.action_queue_url).await?;
    let before_first = SystemTime::now();
    match stack.aggregator.invoke(event.clone()).await? {
        Invocation::Error { error_type, .. } => assert_eq!(error_type, "Aggregator.RefreshQueue"),
        other => panic!("the send failed, so must the invocation: {other:?}"),
    }
    // The message goes before the write that opens the window: no window without one.
    assert!(
        stack
            .clients
            .bucket_item(&stack.table, &bucket)
            .await?
            .is_none(),
        "no window may exist without its message"
    );
    assert!(stack
        .aggregator
        .output_contains("Failed to record events; the invocation will be retried"));

    // The queue comes back; Lambda's async retry delivers the same event again.
    recreate_action_queue(&stack).await?;
    let retried = stack.aggregator.invoke(event).await?;
    let retried = report(&retried);
    assert_eq!(count(retried, "windowsOpened"), 1, "{retried}");
    assert_eq!(count(retried, "messagesSent"), 1, "{retried}");
    assert_eq!(count(retried, "windowWrites"), 1, "{retried}");
    let sent = item(&stack, &bucket).await?;
    assert_eq!(
        (num(&sent, "Generation"), num(&sent, "SentGeneration")),
        (1, 1)
    );
    assert_eq!(folders(&sent), ["/dir/"]);
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1),
        "one delayed message"
    );

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0));
    assert_eq!(refreshes_of(&stack, &share), 1);
    assert!(all_refreshes_after(&stack, &share, before_first));
    let done = item(&stack, &bucket).await?;
    assert_eq!(num(&done, "RefreshedGeneration"), 1);
    Ok(())
}

#[tokio::test]
async fn queue_unavailable_during_send_then_the_retry_joins_a_window_another_event_opened(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: LONG_WINDOW_SECONDS,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "queue-gone-2").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    // Prefix shares: each is refreshed only if its own folder is in the window.
    let share_a = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "a/"));
    let share_b = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, "b/"));
    let share_c = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "c/"));
    let first = put_events(&stack, &bucket, &["a/1.txt"]).await?.remove(0);

    delete_queue(&stack, &stack.action_queue_url).await?;
    let before_first = SystemTime::now();
    let failed = stack.aggregator.invoke(first.clone()).await?;
    assert!(failed.is_error(), "{failed:?}");
    assert!(stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .is_none());

    // Another object of the bucket, in another folder, opens the window first; then
    // Lambda's retry of the failed event joins it.
    recreate_action_queue(&stack).await?;
    let second = put_events(&stack, &bucket, &["b/2.txt"]).await?.remove(0);
    let opened = stack.aggregator.invoke(second).await?;
    let opened = report(&opened);
    assert_eq!(
        (
            count(opened, "windowsOpened"),
            count(opened, "messagesSent")
        ),
        (1, 1),
        "{opened}"
    );
    let retried = stack.aggregator.invoke(first).await?;
    let retried = report(&retried);
    assert_eq!(
        (
            count(retried, "windowsOpened"),
            count(retried, "windowsJoined"),
            count(retried, "messagesSent")
        ),
        (0, 1, 0),
        "{retried}"
    );
    let sent = item(&stack, &bucket).await?;
    assert_eq!(num(&sent, "SentGeneration"), 1);
    assert_eq!(folders(&sent), ["/a/", "/b/"]);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0));
    // The failed event's folder is refreshed through the message the later event sent.
    assert_eq!(refreshes_of(&stack, &share_a), 1);
    assert_eq!(refreshes_of(&stack, &share_b), 1);
    assert_eq!(refreshes_of(&stack, &share_c), 0);
    assert!(all_refreshes_after(&stack, &share_a, before_first));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Storage Gateway refusing RefreshCache
// ---------------------------------------------------------------------------------

/// The share item's pending listings.
async fn pending_of(stack: &Stack, share: &str) -> Result<Vec<String>, BoxError> {
    Ok(item(stack, &format!("share#{share}"))
        .await?
        .get("Pending")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default())
}

#[tokio::test]
async fn a_throttled_refresh_waits_in_its_share_and_a_wake_up_retries_it() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "throttle").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let first = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let second = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    stack
        .gateway
        .fail_next("RefreshCache", 1, InjectedFailure::Throttle);

    let events = put_events(&stack, &bucket, &["k1", "k2"]).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert_eq!(feed.total("messagesSent"), 1);

    // The window is handed to both shares: one is throttled, the other refreshed. The
    // message succeeds: the throttled share keeps the folders and a wake-up.
    let pass1 = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((pass1.messages, pass1.batch_item_failures), (1, 0));
    assert_eq!(stack.gateway.rejected_refreshes(), 1);
    let refused = [&first, &second]
        .into_iter()
        .find(|s| refreshes_of(&stack, s) == 0)
        .ok_or("no share was refused")?
        .clone();
    assert_eq!(pending_of(&stack, &refused).await?, ["/"]);
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 1);
    assert!(stack.refresher.output_contains("Refresh throttled"));

    // The wake-up comes after the back-off and refreshes it.
    let settled = stack.settle(Duration::from_secs(30)).await?;
    assert!(settled.wake_ups >= 1, "{settled:?}");
    assert_eq!(settled.batch_item_failures, 0);
    assert_eq!(refreshes_of(&stack, &first), 1);
    assert_eq!(refreshes_of(&stack, &second), 1);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 3);
    assert!(pending_of(&stack, &refused).await?.is_empty());
    assert_eq!(
        stack.gateway.calls_to("ListFileShares"),
        1,
        "a throttle keeps the share map"
    );
    Ok(())
}

#[tokio::test]
async fn refreshes_that_someone_else_started_hold_ours_back_until_they_complete(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "in-flight").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, ""));

    // Two refreshes that someone else started, and that do not finish on their own.
    stack.gateway.set_refresh_duration(Duration::MAX);
    let sgw = aws_sdk_storagegateway::Client::new(&sdk_config(&stack.gateway.endpoint()).await);
    for _ in 0..2 {
        sgw.refresh_cache().file_share_arn(&share).send().await?;
    }
    assert_eq!(stack.gateway.in_flight_refreshes(&share), 2);

    let events = put_events(&stack, &bucket, &["x/y.txt"]).await?;
    stack.invoke_aggregator(&events).await?;
    let pass1 = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((pass1.messages, pass1.batch_item_failures), (1, 0));
    assert_eq!(stack.gateway.rejected_refreshes(), 1);
    let rejected = stack.gateway.refresh_calls_on(&share);
    let last = rejected.last().ok_or("no RefreshCache call")?;
    assert_eq!(
        last.error_type.as_deref(),
        Some("InvalidGatewayRequestException")
    );
    assert!(!last.injected, "the stand-in's own limit, not an injection");
    assert_eq!(refreshes_of(&stack, &share), 2, "only the two outside ones");
    assert_eq!(pending_of(&stack, &share).await?, ["/", "/x"]);

    // Their completion events are not ours (no slot holds their ids); the wake-up
    // after the back-off calls the share, which is free by then.
    stack
        .gateway
        .set_refresh_duration(Duration::from_millis(50));
    stack.gateway.complete_refreshes();
    let settled = stack.settle(Duration::from_secs(30)).await?;
    assert_eq!(settled.batch_item_failures, 0);
    assert_eq!(refreshes_of(&stack, &share), 3);
    assert!(pending_of(&stack, &share).await?.is_empty());
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 1);
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 1);
    Ok(())
}

// ---------------------------------------------------------------------------------
// 5xx from ListFileShares, and a gateway that cannot be reached
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn one_500_on_list_file_shares_is_retried_by_the_sdk() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "list-500").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    stack
        .gateway
        .fail_next("ListFileShares", 1, InjectedFailure::InternalError);

    let events = put_events(&stack, &bucket, &["k"]).await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(
        (run.messages, run.batch_item_failures),
        (1, 0),
        "refreshed on the first pass"
    );
    let lists: Vec<RecordedCall> = stack
        .gateway
        .calls()
        .into_iter()
        .filter(|c| c.operation == "ListFileShares")
        .collect();
    assert_eq!(lists.len(), 2, "the failed attempt and the SDK's retry");
    assert_eq!((lists[0].status, lists[0].injected), (500, true));
    assert_eq!(lists[1].status, 200);
    assert_eq!(refreshes_of(&stack, &share), 1);
    Ok(())
}

#[tokio::test]
async fn list_file_shares_failing_past_the_sdk_retries_is_redelivered() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    set_visibility_timeout(&stack, 1).await?;
    let bucket = new_bucket(&stack, "list-500x3").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    // The SDK makes 3 attempts; fail them all.
    stack
        .gateway
        .fail_next("ListFileShares", 3, InjectedFailure::InternalError);

    let events = put_events(&stack, &bucket, &["k"]).await?;
    stack.invoke_aggregator(&events).await?;
    let pass1 = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((pass1.messages, pass1.batch_item_failures), (1, 1));
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 3);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 0);
    let closed = item(&stack, &bucket).await?;
    assert_eq!(
        (
            num(&closed, "ClosedGeneration"),
            num(&closed, "RefreshedGeneration")
        ),
        (1, 0)
    );

    let pass2 = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((pass2.messages, pass2.batch_item_failures), (1, 0));
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 4);
    assert_eq!(refreshes_of(&stack, &share), 1);
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 1);
    Ok(())
}

#[tokio::test]
async fn unreachable_gateway_is_a_batch_item_failure_not_a_drop() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    set_visibility_timeout(&stack, 1).await?;
    let bucket = new_bucket(&stack, "gw-down").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    // A loopback port that nobody listens on.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let cut_off = custom_refresher(
        &stack,
        &format!("http://127.0.0.1:{closed_port}"),
        &stack.table,
    )
    .await?;

    let events = put_events(&stack, &bucket, &["k"]).await?;
    stack.invoke_aggregator(&events).await?;
    let messages = receive_action_messages(&stack, 1, stack.window_wait()).await?;
    let failed = invoke_refresher(&stack, &cut_off, &messages).await?;
    assert_eq!(
        failed,
        [messages[0].message_id().unwrap_or_default().to_string()]
    );
    assert!(cut_off.output_contains("Refresh failed; the message will be redelivered"));
    assert!(stack.gateway.calls().is_empty());

    // The gateway is back (the stack's refresher reaches it): the redelivery works.
    let redelivered = receive_action_messages(&stack, 1, Duration::from_secs(15)).await?;
    assert_eq!(redelivered[0].message_id(), messages[0].message_id());
    assert_eq!(receive_count(&redelivered[0]), 2);
    let failed = invoke_refresher(&stack, &stack.refresher, &redelivered).await?;
    assert!(failed.is_empty(), "{failed:?}");
    delete_message(&stack, &redelivered[0]).await?;
    assert_eq!(refreshes_of(&stack, &share), 1);
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 1);
    Ok(())
}

// ---------------------------------------------------------------------------------
// A share removed and re-created under a new ARN
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_share_recreated_under_a_new_arn_is_found_and_refreshed() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "recreated").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    // Both NFS, `kept` first: the refresher refreshes it before the replaced one.
    let kept = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let old = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));

    // Window 1 warms the refresher's share map.
    let events = put_events(&stack, &bucket, &["one"]).await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(
        (refreshes_of(&stack, &kept), refreshes_of(&stack, &old)),
        (1, 1)
    );
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 1);

    assert!(stack.gateway.remove_share(&old));
    let new = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    assert_ne!(new, old);

    // Window 2: the refresher lists the shares after closing the window, finds an ARN
    // that its cached map does not know, and resolves the map anew: the old share is
    // not called at all, the new one gets the change.
    let events = put_events(&stack, &bucket, &["two"]).await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(
        stack.gateway.calls_to("ListFileShares"),
        2,
        "one listing per window, reused by the resolve"
    );
    assert_eq!(refreshes_of(&stack, &new), 1);
    assert_eq!(refreshes_of(&stack, &kept), 2);
    assert_eq!(
        stack.gateway.refresh_calls_on(&old).len(),
        1,
        "never called once gone"
    );

    // Window 3: the same map serves (listed again, nothing new); the old share is
    // never called again.
    let events = put_events(&stack, &bucket, &["three"]).await?;
    stack.invoke_aggregator(&events).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 3);
    assert_eq!(stack.gateway.refresh_calls_on(&old).len(), 1);
    assert_eq!(
        (refreshes_of(&stack, &kept), refreshes_of(&stack, &new)),
        (3, 2)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// S3 events duplicated, reordered and late
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn duplicated_and_reordered_events_give_one_message_per_window() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: LONG_WINDOW_SECONDS,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "dup-order").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share_a = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "a/"));
    let share_c = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "c/"));
    let events = put_events(&stack, &bucket, &["a/1", "b/2", "c/3"]).await?;
    // Newest first, then every event again, then the first one a third time.
    let mut delivered: Vec<Value> = events.iter().rev().cloned().collect();
    delivered.extend(events.iter().cloned());
    delivered.push(events[0].clone());

    let feed = stack.invoke_aggregator(&delivered).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("windowsOpened"), 1);
    assert_eq!(feed.total("windowsJoined"), 6);
    assert_eq!(feed.total("messagesSent"), 1);
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1)
    );
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "Generation"), 1);
    assert_eq!(folders(&window), ["/a/", "/b/", "/c/"]);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0));
    assert_eq!(
        (
            refreshes_of(&stack, &share_a),
            refreshes_of(&stack, &share_c)
        ),
        (1, 1)
    );
    Ok(())
}

#[tokio::test]
async fn a_late_event_after_the_refresh_opens_a_new_window_and_is_refreshed() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "late").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));

    // The late event happens first, but is delivered last.
    let late = put_events(&stack, &bucket, &["late/object"])
        .await?
        .remove(0);
    let late_time = decode_notification(&late)?.changes[0]
        .event_time_ms
        .ok_or("moto's eventTime is parseable")?;
    let on_time = put_events(&stack, &bucket, &["on-time/object"]).await?;
    stack.invoke_aggregator(&on_time).await?;
    let window1 = item(&stack, &bucket).await?;
    assert!(
        late_time < num(&window1, "OpenedAt"),
        "the late event happened before window 1 opened"
    );
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(refreshes_of(&stack, &share), 1);
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 1);

    let delivered_at = SystemTime::now();
    let feed = stack.invoke_aggregator(std::slice::from_ref(&late)).await?;
    assert_eq!(
        (feed.total("windowsOpened"), feed.total("messagesSent")),
        (1, 1),
        "window 1 is closed: the late event needs its own refresh"
    );
    let window2 = item(&stack, &bucket).await?;
    assert_eq!(num(&window2, "Generation"), 2);
    assert_eq!(folders(&window2), ["/late/"]);

    let messages = receive_action_messages(&stack, 1, stack.window_wait()).await?;
    let timestamp = messages[0]
        .message_attributes()
        .and_then(|a| a.get("timestamp"))
        .and_then(|a| a.string_value())
        .ok_or("no timestamp attribute")?;
    assert_eq!(
        timestamp,
        late_time.to_string(),
        "the message carries the event's time"
    );
    let failed = invoke_refresher(&stack, &stack.refresher, &messages).await?;
    assert!(failed.is_empty());
    delete_message(&stack, &messages[0]).await?;
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 2);
    assert!(
        refreshes[1].started_at > delivered_at,
        "the refresh that covers the late event started after it was processed"
    );
    assert_eq!(num(&item(&stack, &bucket).await?, "RefreshedGeneration"), 2);
    Ok(())
}

// ---------------------------------------------------------------------------------
// SQS delivering a message more than once
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_message_delivered_twice_is_refreshed_once() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    set_visibility_timeout(&stack, 1).await?;
    let bucket = new_bucket(&stack, "sqs-dup").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let nfs = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let smb = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, ""));
    let events = put_events(&stack, &bucket, &["k"]).await?;
    stack.invoke_aggregator(&events).await?;
    let messages = receive_action_messages(&stack, 1, stack.window_wait()).await?;

    // The same message twice in one batch.
    let twice = [messages[0].clone(), messages[0].clone()];
    let failed = invoke_refresher(&stack, &stack.refresher, &twice).await?;
    assert!(
        failed.is_empty(),
        "a duplicate is not a failure: {failed:?}"
    );
    assert_eq!(
        (refreshes_of(&stack, &nfs), refreshes_of(&stack, &smb)),
        (1, 1)
    );
    assert!(stack
        .refresher
        .output_contains("Window already refreshed; duplicate message"));

    // Not deleted: SQS delivers it again after the visibility timeout.
    let again = receive_action_messages(&stack, 1, Duration::from_secs(15)).await?;
    assert_eq!(again[0].message_id(), messages[0].message_id());
    assert!(receive_count(&again[0]) >= 2);
    let failed = invoke_refresher(&stack, &stack.refresher, &again).await?;
    assert!(failed.is_empty(), "{failed:?}");
    delete_message(&stack, &again[0]).await?;

    // A second copy of the message (as a retried send would make): another message
    // id, the same window.
    let mut copy = stack
        .clients
        .sqs
        .send_message()
        .queue_url(&stack.action_queue_url)
        .message_body(messages[0].body().unwrap_or_default());
    for (name, value) in messages[0].message_attributes().into_iter().flatten() {
        copy = copy.message_attributes(name, value.clone());
    }
    copy.send().await?;
    let run = stack.run_refresher(1, Duration::from_secs(10)).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0));

    assert_eq!(stack.gateway.calls_to("RefreshCache"), 2, "one per share");
    // The completion events free both slots; nothing is left but each share's
    // wake-up for its call's lease end (delayed), which will find nothing to do.
    let settled = stack.settle(Duration::from_secs(30)).await?;
    assert_eq!(settled.batch_item_failures, 0);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 2);
    let left = stack.work_left().await?;
    assert!(
        left.is_done() && left.shares_in_flight.is_empty(),
        "{left:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// DynamoDB unavailable for the refresher
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn refresher_without_its_table_fails_the_message_and_it_is_redelivered(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    set_visibility_timeout(&stack, 1).await?;
    let bucket = new_bucket(&stack, "no-table").await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let missing_table = unique_name("NoSuchTable");
    let no_table = custom_refresher(&stack, &stack.gateway.endpoint(), &missing_table).await?;

    let events = put_events(&stack, &bucket, &["k"]).await?;
    stack.invoke_aggregator(&events).await?;
    let messages = receive_action_messages(&stack, 1, stack.window_wait()).await?;
    let failed = invoke_refresher(&stack, &no_table, &messages).await?;
    assert_eq!(
        failed,
        [messages[0].message_id().unwrap_or_default().to_string()],
        "a store failure is retried, not dropped"
    );
    assert!(no_table.output_contains("Refresh failed; the message will be redelivered"));
    assert!(
        stack.gateway.calls().is_empty(),
        "nothing is refreshed before the window is closed"
    );
    let untouched = item(&stack, &bucket).await?;
    assert_eq!(num(&untouched, "ClosedGeneration"), 0);

    // The redelivery reaches a refresher with its table.
    let redelivered = receive_action_messages(&stack, 1, Duration::from_secs(15)).await?;
    assert_eq!(redelivered[0].message_id(), messages[0].message_id());
    let failed = invoke_refresher(&stack, &stack.refresher, &redelivered).await?;
    assert!(failed.is_empty(), "{failed:?}");
    delete_message(&stack, &redelivered[0]).await?;
    assert_eq!(refreshes_of(&stack, &share), 1);
    let done = item(&stack, &bucket).await?;
    assert_eq!(
        (
            num(&done, "ClosedGeneration"),
            num(&done, "RefreshedGeneration")
        ),
        (1, 1)
    );
    Ok(())
}
