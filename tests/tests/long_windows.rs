//! Windows longer than SQS's 900-second delay, and refresh messages that arrive before
//! their window exists, on the real stack (moto, the stand-in, the compiled binaries).
//!
//! A message delayed by 900 seconds cannot be received within a test. The functions'
//! SQS traffic therefore goes through a recording proxy in front of moto: each
//! `SendMessage` that reached moto is read back from the proxy, and the refresher is
//! invoked with a Lambda SQS event built from it, carrying the real action queue's ARN
//! as `eventSourceARN`, as the event source mapping would once the delay has passed.

use aws_sdk_dynamodb::types::AttributeValue;
use integration_tests::aws::{BoxError, ACCOUNT_ID, REGION};
use integration_tests::counting_proxy::{CountingProxy, Exchange};
use integration_tests::moto::Moto;
use integration_tests::runtime_api::Invocation;
use integration_tests::sgw_standin::ShareKind;
use integration_tests::stack::{Stack, StackOptions};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The window messages sent through `sqs` (by the aggregator, or sent back by the
/// refresher): not the wake-ups that every `RefreshCache` call leaves its share for
/// the call's lease end.
fn window_sends(sqs: &CountingProxy) -> Vec<Exchange> {
    sqs.exchanges("SendMessage")
        .into_iter()
        .filter(|e| {
            let body = e.request["MessageBody"].as_str().unwrap_or_default();
            integration_tests::stack::action_message_kind(body)
                != integration_tests::stack::ActionMessageKind::WakeUp
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A stack whose functions reach SQS through a recording proxy.
async fn recorded_stack(refresh_delay_seconds: u32) -> Result<(Stack, CountingProxy), BoxError> {
    let moto = Moto::start().await?;
    let sqs = CountingProxy::start_recording(moto.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            refresh_delay_seconds,
            extra_env: vec![("AWS_ENDPOINT_URL_SQS".into(), sqs.endpoint())],
            ..Default::default()
        },
    )
    .await?;
    Ok((stack, sqs))
}

/// A bucket whose `s3:TestEvent` is consumed, with one root share.
async fn bucket_with_share(stack: &Stack, prefix: &str) -> Result<(String, String), BoxError> {
    let bucket = stack.create_bucket(prefix).await?;
    let events = stack.collect_s3_events(1).await?;
    assert_eq!(events[0]["Event"], "s3:TestEvent", "{events:?}");
    let gw = stack.gateway.add_gateway("gw-1");
    let share = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
    Ok((bucket, share))
}

/// Puts `key` and gives moto's notification of it to the aggregator.
async fn put_and_aggregate(stack: &Stack, bucket: &str, key: &str) -> Result<Value, BoxError> {
    stack.clients.put_object(bucket, key).await?;
    let events = stack.collect_s3_events(1).await?;
    match stack.aggregator.invoke(events[0].clone()).await? {
        Invocation::Response(report) => Ok(report),
        Invocation::Error {
            error_type,
            error_message,
        } => Err(format!("aggregator failed: {error_type}: {error_message}").into()),
    }
}

/// The Lambda SQS record of a message that `exchange` (a `SendMessage` that reached
/// moto) put on the queue `queue_arn`.
fn record_of_sent(exchange: &Exchange, queue_arn: &str) -> Value {
    let attributes: Map<String, Value> = exchange.request["MessageAttributes"]
        .as_object()
        .map(|attributes| {
            attributes
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        json!({
                            "stringValue": a["StringValue"],
                            "stringListValues": [],
                            "binaryListValues": [],
                            "dataType": a["DataType"],
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "messageId": exchange.response["MessageId"],
        "receiptHandle": "recorded-by-the-test",
        "body": exchange.request["MessageBody"],
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": attributes,
        "md5OfBody": exchange.response["MD5OfMessageBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    })
}

/// A Lambda SQS record of a refresh message with `body`, as the aggregator sends it.
fn record_of_body(message_id: &str, body: &Value, queue_arn: &str) -> Value {
    json!({
        "messageId": message_id,
        "receiptHandle": "made-by-the-test",
        "body": body.to_string(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {
            "bucket-name": {"stringValue": body["bucket"], "stringListValues": [],
                            "binaryListValues": [], "dataType": "String"},
            "timestamp": {"stringValue": body["timestampMs"].to_string(), "stringListValues": [],
                          "binaryListValues": [], "dataType": "Number"},
        },
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    })
}

/// Invokes the refresher with `records` as one SQS event; the ids it reports failed.
async fn invoke_refresher(stack: &Stack, records: Vec<Value>) -> Result<Vec<String>, BoxError> {
    match stack
        .refresher
        .invoke(json!({ "Records": records }))
        .await?
    {
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

type Item = HashMap<String, AttributeValue>;

async fn item(stack: &Stack, bucket: &str) -> Result<Item, BoxError> {
    Ok(stack
        .clients
        .bucket_item(&stack.table, bucket)
        .await?
        .ok_or_else(|| format!("no window item for {bucket}"))?)
}

/// A numeric attribute; `None` when absent.
fn num(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

async fn set_window_end(stack: &Stack, bucket: &str, ends_at_ms: i64) -> Result<(), BoxError> {
    stack
        .clients
        .dynamodb
        .update_item()
        .table_name(&stack.table)
        .key("BucketName", AttributeValue::S(bucket.to_string()))
        .update_expression("SET WindowEndsAt = :ends")
        .expression_attribute_values(":ends", AttributeValue::N(ends_at_ms.to_string()))
        .send()
        .await?;
    Ok(())
}

fn body_of(exchange: &Exchange) -> Result<Value, BoxError> {
    let body = exchange.request["MessageBody"]
        .as_str()
        .ok_or("SendMessage without a MessageBody")?;
    Ok(serde_json::from_str(body)?)
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_window_longer_than_900_seconds_is_sent_back_until_it_ends() -> Result<(), BoxError> {
    let (stack, sqs) = recorded_stack(1000).await?;
    let (bucket, share) = bucket_with_share(&stack, "long").await?;
    let queue_name = stack
        .action_queue_url
        .rsplit('/')
        .next()
        .ok_or("queue URL without a name")?
        .to_string();

    let opened = put_and_aggregate(&stack, &bucket, "reports/q1.csv").await?;
    assert_eq!(
        (
            count(&opened, "windowsOpened"),
            count(&opened, "messagesSent")
        ),
        (1, 1),
        "{opened}"
    );
    let sends = window_sends(&sqs);
    assert_eq!(sends.len(), 1, "{:?}", sqs.all_exchanges());
    let first = &sends[0];
    assert_eq!(first.request["QueueUrl"], stack.action_queue_url.as_str());
    assert_eq!(
        first.request["DelaySeconds"], 900,
        "SQS delays at most 900 s"
    );
    assert_eq!(
        first.request["MessageAttributes"]["bucket-name"]["StringValue"],
        bucket.as_str()
    );
    let body = body_of(first)?;
    assert_eq!(body["bucket"], bucket.as_str());
    assert_eq!(body["generation"], 1);
    let opened_at = body["windowOpenedAtMs"]
        .as_i64()
        .ok_or("windowOpenedAtMs")?;
    let ends_at = body["windowEndsAtMs"].as_i64().ok_or("windowEndsAtMs")?;
    assert_eq!(ends_at - opened_at, 1_000_000);
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1),
        "one delayed message"
    );
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "OpenedAt"), Some(opened_at));
    assert_eq!(num(&window, "WindowEndsAt"), Some(ends_at));
    assert_eq!(num(&window, "ClosedGeneration"), None);

    // The message comes back after 900 s, 100 s before its window ends: it goes back
    // to the queue it came from (found with GetQueueUrl from its eventSourceARN).
    let failed =
        invoke_refresher(&stack, vec![record_of_sent(first, &stack.action_queue_arn)]).await?;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        stack.gateway.calls().is_empty(),
        "no refresh and no share lookup before the window ends"
    );
    let lookups = sqs.exchanges("GetQueueUrl");
    assert_eq!(lookups.len(), 1, "{:?}", sqs.all_exchanges());
    assert_eq!(lookups[0].request["QueueName"], queue_name.as_str());
    assert_eq!(lookups[0].request["QueueOwnerAWSAccountId"], ACCOUNT_ID);
    assert_eq!(
        lookups[0].response["QueueUrl"],
        stack.action_queue_url.as_str()
    );
    let sends = window_sends(&sqs);
    assert_eq!(sends.len(), 2, "{:?}", sqs.all_exchanges());
    let requeued = &sends[1];
    assert_eq!(
        requeued.request["QueueUrl"],
        stack.action_queue_url.as_str()
    );
    assert_eq!(requeued.request["DelaySeconds"], 900, "about 999 s remain");
    assert_eq!(body_of(requeued)?, body);
    assert_eq!(
        requeued.request["MessageAttributes"]["bucket-name"]["StringValue"],
        bucket.as_str()
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 2),
        "the message sent back is on the action queue, delayed"
    );
    assert!(stack
        .refresher
        .output_contains("Window ends later; message sent back for the rest of it"));
    // The window still takes events: it was not closed.
    assert_eq!(num(&item(&stack, &bucket).await?, "ClosedGeneration"), None);
    let joined = put_and_aggregate(&stack, &bucket, "later/x.csv").await?;
    assert_eq!(
        (
            count(&joined, "windowsJoined"),
            count(&joined, "messagesSent"),
            count(&joined, "windowWrites")
        ),
        (1, 0, 1),
        "{joined}"
    );

    // Delivered again with 30 s left: it goes back for exactly the rest of the window.
    set_window_end(&stack, &bucket, now_ms() + 30_000).await?;
    let failed = invoke_refresher(
        &stack,
        vec![record_of_sent(requeued, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    let sends = window_sends(&sqs);
    assert_eq!(sends.len(), 3, "{:?}", sqs.all_exchanges());
    let delay = sends[2].request["DelaySeconds"]
        .as_i64()
        .ok_or("no DelaySeconds")?;
    assert!((29..=30).contains(&delay), "delay {delay}");
    assert_eq!(
        sqs.exchanges("GetQueueUrl").len(),
        1,
        "the URL is looked up once"
    );
    assert!(stack.gateway.calls().is_empty());

    // Once the window has ended, the message closes it and refreshes every folder
    // that joined it, exactly once.
    set_window_end(&stack, &bucket, now_ms() - 1_000).await?;
    let before_refresh = SystemTime::now();
    let failed = invoke_refresher(
        &stack,
        vec![record_of_sent(&sends[2], &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert_eq!(refreshes[0].share_arn, share);
    let mut folders = refreshes[0].folder_list.clone();
    folders.sort();
    assert_eq!(folders, ["/", "/later", "/reports"]);
    assert!(!refreshes[0].recursive);
    assert!(refreshes[0].started_at > before_refresh);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 1);
    assert_eq!(window_sends(&sqs).len(), 3, "not sent back again");
    let done = item(&stack, &bucket).await?;
    assert_eq!(num(&done, "ClosedGeneration"), Some(1));
    assert_eq!(num(&done, "RefreshedGeneration"), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_message_that_overtakes_its_window_is_sent_back_and_an_orphan_is_dropped(
) -> Result<(), BoxError> {
    let (stack, sqs) = recorded_stack(2).await?;
    let (bucket, share) = bucket_with_share(&stack, "race").await?;

    // Window 1 runs its course.
    let opened = put_and_aggregate(&stack, &bucket, "one/a.txt").await?;
    assert_eq!(count(&opened, "windowsOpened"), 1, "{opened}");
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert_eq!(stack.gateway.refreshes().len(), 1);
    assert_eq!(
        num(&item(&stack, &bucket).await?, "RefreshedGeneration"),
        Some(1)
    );

    // The aggregator that opens window 2 sends its message first; here the message is
    // delivered before that opener's write reached the table.
    let now = now_ms();
    let early = json!({"version": 1, "bucket": bucket, "generation": 2, "windowOpenedAtMs": now,
        "windowEndsAtMs": now + 2_000, "timestampMs": now});
    let sends_before = window_sends(&sqs).len();
    let failed = invoke_refresher(
        &stack,
        vec![record_of_body("early-2", &early, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(stack.gateway.refreshes().len(), 1, "nothing to refresh yet");
    let sends = window_sends(&sqs);
    assert_eq!(
        sends.len(),
        sends_before + 1,
        "sent back, not dropped: {:?}",
        sqs.all_exchanges()
    );
    let back = &sends[sends_before];
    assert_eq!(back.request["QueueUrl"], stack.action_queue_url.as_str());
    assert_eq!(back.request["DelaySeconds"], 1, "looked at again shortly");
    assert_eq!(body_of(back)?, early);
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "Generation"), Some(1));
    assert_eq!(num(&window, "ClosedGeneration"), Some(1));

    // The opener's write lands: window 2 opens (with a message of its own).
    let opened = put_and_aggregate(&stack, &bucket, "two/b.txt").await?;
    assert_eq!(count(&opened, "windowsOpened"), 1, "{opened}");
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "Generation"), Some(2));
    let ends_at = num(&window, "WindowEndsAt").ok_or("no WindowEndsAt")?;
    let wait = ends_at - now_ms() + 200;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    // The message sent back and the opener's own message: window 2 is refreshed once.
    let run = stack.run_refresher(2, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (2, 0), "{run:?}");
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 2, "{refreshes:?}");
    assert_eq!(refreshes[1].share_arn, share);
    let mut folders = refreshes[1].folder_list.clone();
    folders.sort();
    assert_eq!(folders, ["/", "/two"]);
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "RefreshedGeneration"), Some(2));
    assert_eq!(
        window_sends(&sqs).len(),
        sends_before + 2,
        "the requeue and window 2's own message, nothing more"
    );

    // A message for a window that is not in the table, whose opener started more than
    // 15 minutes ago (the longest a Lambda invocation runs): an orphan of a failed
    // invocation, dropped with a log line.
    let now = now_ms();
    let orphan = json!({"version": 1, "bucket": bucket, "generation": 3,
        "windowOpenedAtMs": now - 16 * 60 * 1000, "windowEndsAtMs": now - 16 * 60 * 1000 + 2_000,
        "timestampMs": now - 16 * 60 * 1000});
    let sends_before = window_sends(&sqs).len();
    let failed = invoke_refresher(
        &stack,
        vec![record_of_body("orphan-3", &orphan, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(window_sends(&sqs).len(), sends_before, "not sent back");
    assert_eq!(stack.gateway.refreshes().len(), 2, "not refreshed");
    let line = stack
        .refresher
        .output_lines()
        .into_iter()
        .find(|l| l.contains("Window was never opened"))
        .ok_or("no log line for the dropped orphan")?;
    assert!(line.contains(&bucket), "{line}");
    assert_eq!(num(&item(&stack, &bucket).await?, "Generation"), Some(2));

    // One whose opener started 14 minutes ago may still be running: it is looked at
    // again, after at most a minute.
    let late = json!({"version": 1, "bucket": bucket, "generation": 3,
        "windowOpenedAtMs": now - 14 * 60 * 1000, "windowEndsAtMs": now - 14 * 60 * 1000 + 2_000,
        "timestampMs": now - 14 * 60 * 1000});
    let failed = invoke_refresher(
        &stack,
        vec![record_of_body("late-3", &late, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    let sends = window_sends(&sqs);
    assert_eq!(sends.len(), sends_before + 1, "{:?}", sqs.all_exchanges());
    assert_eq!(sends[sends_before].request["DelaySeconds"], 60);
    assert_eq!(body_of(&sends[sends_before])?, late);
    assert_eq!(stack.gateway.refreshes().len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_first_window_message_that_overtakes_its_open_waits_and_a_lost_item_refreshes_all(
) -> Result<(), BoxError> {
    let (stack, sqs) = recorded_stack(2).await?;
    let (bucket, share) = bucket_with_share(&stack, "first").await?;
    // Shares are resolved once per container (and cached): add every share first.
    let (lost, lost_share) = bucket_with_share(&stack, "lost").await?;

    // The bucket's first window: its message is delivered before the opener's write,
    // so the table has no item for the bucket at all.
    let now = now_ms();
    let early = json!({"version": 1, "bucket": bucket, "generation": 1, "windowOpenedAtMs": now,
        "windowEndsAtMs": now + 2_000, "timestampMs": now});
    let failed = invoke_refresher(
        &stack,
        vec![record_of_body("early-1", &early, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        stack.gateway.calls().is_empty(),
        "no refresh before the window exists: {:?}",
        stack.gateway.calls()
    );
    let sends = window_sends(&sqs);
    assert_eq!(sends.len(), 1, "{:?}", sqs.all_exchanges());
    assert_eq!(
        sends[0].request["QueueUrl"],
        stack.action_queue_url.as_str()
    );
    assert_eq!(sends[0].request["DelaySeconds"], 1);
    assert_eq!(body_of(&sends[0])?, early);
    assert!(stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .is_none());

    // The open lands, and later events join the window: the message sent back
    // refreshes them (the window's own message is then a duplicate).
    let opened = put_and_aggregate(&stack, &bucket, "first/a.txt").await?;
    assert_eq!(count(&opened, "windowsOpened"), 1, "{opened}");
    let joined = put_and_aggregate(&stack, &bucket, "second/b.txt").await?;
    assert_eq!(count(&joined, "windowsJoined"), 1, "{joined}");
    let ends_at = num(&item(&stack, &bucket).await?, "WindowEndsAt").ok_or("no WindowEndsAt")?;
    let wait = ends_at - now_ms() + 200;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let run = stack.run_refresher(2, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (2, 0), "{run:?}");
    let refreshes = stack.gateway.refreshes();
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert_eq!(refreshes[0].share_arn, share);
    let mut folders = refreshes[0].folder_list.clone();
    folders.sort();
    assert_eq!(folders, ["/", "/first", "/second"]);
    assert!(!refreshes[0].recursive);
    let window = item(&stack, &bucket).await?;
    assert_eq!(num(&window, "ClosedGeneration"), Some(1));
    assert_eq!(num(&window, "RefreshedGeneration"), Some(1));

    // A message whose bucket has had no item for more than 15 minutes: the item was
    // deleted, and what changed is unknown, so every share of the bucket is refreshed
    // whole.
    let long_ago = now_ms() - 16 * 60 * 1000;
    let old = json!({"version": 1, "bucket": lost, "generation": 4, "windowOpenedAtMs": long_ago,
        "windowEndsAtMs": long_ago + 2_000, "timestampMs": long_ago});
    let sends_before = window_sends(&sqs).len();
    let failed = invoke_refresher(
        &stack,
        vec![record_of_body("lost-4", &old, &stack.action_queue_arn)],
    )
    .await?;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(window_sends(&sqs).len(), sends_before, "not sent back");
    let whole: Vec<_> = stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == lost_share)
        .collect();
    assert_eq!(whole.len(), 1, "{whole:?}");
    assert_eq!(whole[0].folder_list, ["/"]);
    assert!(whole[0].recursive);
    Ok(())
}
