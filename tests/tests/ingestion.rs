//! The ways S3 object events reach the aggregator, on the real stack: an SQS ingest
//! queue that S3 notifies (delivered as one Lambda SQS event), S3 → SNS (a Lambda SNS
//! event, and S3 → SNS → SQS), and S3 → EventBridge (the event itself, and EventBridge
//! → SQS). Every event is one that moto emitted for a real object, except the
//! EventBridge restore event, which moto does not emit and which is built from the
//! S3 User Guide's example.
//!
//! The aggregator's DynamoDB requests go through a counting proxy, so the tests count
//! the writes that really reached the table.

use aws_sdk_s3::types::{EventBridgeConfiguration, NotificationConfiguration, TopicConfiguration};
use aws_sdk_sqs::types::Message;
use integration_tests::aws::{lambda_sqs_event, unique_name, BoxError, ACCOUNT_ID, REGION};
use integration_tests::counting_proxy::CountingProxy;
use integration_tests::moto::Moto;
use integration_tests::runtime_api::{http_request, Invocation};
use integration_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// A stack whose aggregator reaches DynamoDB through a counting proxy.
async fn counted_stack(refresh_delay_seconds: u32) -> Result<(Stack, CountingProxy), BoxError> {
    let moto = Moto::start().await?;
    let dynamodb = CountingProxy::start(moto.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            refresh_delay_seconds,
            extra_env: vec![("AWS_ENDPOINT_URL_DYNAMODB".into(), dynamodb.endpoint())],
            ..Default::default()
        },
    )
    .await?;
    Ok((stack, dynamodb))
}

fn response(invocation: Invocation) -> Value {
    match invocation {
        Invocation::Response(value) => value,
        Invocation::Error {
            error_type,
            error_message,
        } => panic!("expected a response, got {error_type}: {error_message}"),
    }
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

fn failed_ids(response: &Value) -> BTreeSet<String> {
    response["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not a batch response: {response}"))
        .iter()
        .map(|f| {
            f["itemIdentifier"]
                .as_str()
                .unwrap_or_else(|| panic!("no itemIdentifier in {f}"))
                .to_string()
        })
        .collect()
}

/// The bucket's `Folders`, sorted; empty without an item.
async fn folders(stack: &Stack, bucket: &str) -> Result<Vec<String>, BoxError> {
    let Some(item) = stack.clients.bucket_item(&stack.table, bucket).await? else {
        return Ok(Vec::new());
    };
    let mut folders = item
        .get("Folders")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    folders.sort();
    Ok(folders)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn send_body(stack: &Stack, url: &str, body: &str) -> Result<(), BoxError> {
    stack
        .clients
        .sqs
        .send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await?;
    Ok(())
}

/// Receives (and deletes) exactly `expected` messages from `url`.
async fn drain_exactly(
    stack: &Stack,
    url: &str,
    expected: usize,
) -> Result<Vec<Message>, BoxError> {
    let messages = stack
        .clients
        .drain(url, expected, Duration::from_secs(15))
        .await?;
    assert_eq!(messages.len(), expected, "{messages:?}");
    // Nothing else is on the way.
    assert!(stack.clients.receive(url, 10, 1).await?.is_empty());
    Ok(messages)
}

/// Receives (and deletes) messages from `url` until at least `min` arrived and the
/// queue then stays empty for a second.
async fn drain_until_quiet(stack: &Stack, url: &str, min: usize) -> Result<Vec<Message>, BoxError> {
    let mut messages = stack
        .clients
        .drain(url, min, Duration::from_secs(15))
        .await?;
    assert!(messages.len() >= min, "{messages:?}");
    loop {
        let more = stack.clients.drain(url, 1, Duration::from_secs(1)).await?;
        if more.is_empty() {
            return Ok(messages);
        }
        messages.extend(more);
    }
}

fn body_json(message: &Message) -> Option<Value> {
    message.body().and_then(|b| serde_json::from_str(b).ok())
}

/// A request to moto in an AWS JSON protocol (`X-Amz-Target`), for services the tests
/// have no SDK client for.
async fn moto_json(
    stack: &Stack,
    service: &str,
    target: &str,
    body: Value,
) -> Result<Value, BoxError> {
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/{service}/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=0"
    );
    let body = body.to_string();
    let response = http_request(
        stack.moto.authority(),
        "POST",
        "/",
        &[
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", target),
            ("X-Amz-Date", "20260101T000000Z"),
            ("Authorization", &authorization),
        ],
        body.as_bytes(),
    )
    .await?;
    if response.status != 200 {
        return Err(format!("{target}: HTTP {}: {}", response.status, response.text()).into());
    }
    Ok(response.json()?)
}

fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request to moto in the AWS query protocol (SNS); returns the XML answer.
async fn moto_query(
    stack: &Stack,
    service: &str,
    params: &[(&str, &str)],
) -> Result<String, BoxError> {
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/{service}/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=0"
    );
    let body: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect();
    let body = body.join("&");
    let response = http_request(
        stack.moto.authority(),
        "POST",
        "/",
        &[
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("X-Amz-Date", "20260101T000000Z"),
            ("Authorization", &authorization),
        ],
        body.as_bytes(),
    )
    .await?;
    let text = response.text();
    if response.status != 200 {
        return Err(format!("{params:?}: HTTP {}: {text}", response.status).into());
    }
    Ok(text)
}

/// The text of the first `<tag>` element.
fn xml_value(xml: &str, tag: &str) -> Result<String, BoxError> {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .ok_or_else(|| format!("no <{tag}> in {xml}"))?
        + open.len();
    let end = xml[start..]
        .find(&format!("</{tag}>"))
        .ok_or_else(|| format!("no </{tag}> in {xml}"))?;
    Ok(xml[start..start + end].to_string())
}

// ---------------------------------------------------------------------------------
// S3 → SQS ingest queue → one Lambda SQS event
// ---------------------------------------------------------------------------------

/// Keys put in the two buckets of the batch tests, and the folders they record.
const KEYS_A: [&str; 3] = ["a1/x.txt", "a1/y.txt", "a2/deep/z.txt"];
const KEYS_B: [&str; 2] = ["b1/q.txt", "root.txt"];
const FOLDERS_A: [&str; 2] = ["/a1/", "/a2/deep/"];
const FOLDERS_B: [&str; 2] = ["/", "/b1/"];

/// One batch as an SQS event source mapping would deliver it from the ingest queue.
struct IngestBatch {
    bucket_a: String,
    bucket_b: String,
    event: Value,
    /// messageId of each message with object events, by the buckets it names.
    object_messages: BTreeMap<String, BTreeSet<String>>,
    test_event_messages: BTreeSet<String>,
    garbage_message: String,
    /// A message whose notification holds a record of each bucket, if asked for.
    mixed_message: Option<String>,
    messages: Vec<Message>,
}

impl IngestBatch {
    fn object_ids(&self, bucket: &str) -> BTreeSet<String> {
        self.object_messages
            .iter()
            .filter(|(_, buckets)| buckets.contains(bucket))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Two buckets notify the stack's events queue (moto's real S3 event JSON); a garbage
/// body, and optionally one notification with a record of each bucket, are queued
/// too. All of it, the buckets' `s3:TestEvent`s included, becomes one Lambda SQS
/// event.
async fn ingest_batch(stack: &Stack, with_mixed: bool) -> Result<IngestBatch, BoxError> {
    let bucket_a = stack.create_bucket("ingest-a").await?;
    let bucket_b = stack.create_bucket("ingest-b").await?;
    for key in KEYS_A {
        stack.clients.put_object(&bucket_a, key).await?;
    }
    for key in KEYS_B {
        stack.clients.put_object(&bucket_b, key).await?;
    }
    if with_mixed {
        stack.clients.put_object(&bucket_b, "b1/mixed.txt").await?;
        stack.clients.put_object(&bucket_a, "a1/mixed.txt").await?;
    }
    let garbage = "this is not an S3 event {";
    send_body(stack, &stack.events_queue_url, garbage).await?;
    let expected = 2 + KEYS_A.len() + KEYS_B.len() + 2 * usize::from(with_mixed) + 1;
    let mut messages = drain_exactly(stack, &stack.events_queue_url, expected).await?;
    if with_mixed {
        // The two real notifications of the "mixed" objects become one notification
        // with a record of each bucket.
        let is_mixed = |m: &Message| {
            body_json(m).is_some_and(|b| {
                b["Records"][0]["s3"]["object"]["key"]
                    .as_str()
                    .is_some_and(|k| k.ends_with("mixed.txt"))
            })
        };
        let records: Vec<Value> = messages
            .iter()
            .filter(|m| is_mixed(m))
            .filter_map(body_json)
            .map(|b| b["Records"][0].clone())
            .collect();
        assert_eq!(records.len(), 2);
        messages.retain(|m| !is_mixed(m));
        let mixed = json!({ "Records": records }).to_string();
        send_body(stack, &stack.events_queue_url, &mixed).await?;
        messages.extend(drain_exactly(stack, &stack.events_queue_url, 1).await?);
    }

    let mut object_messages = BTreeMap::new();
    let mut test_event_messages = BTreeSet::new();
    let mut garbage_message = None;
    let mut mixed_message = None;
    for m in &messages {
        let id = m.message_id().ok_or("no messageId")?.to_string();
        match body_json(m) {
            None => {
                assert_eq!(m.body(), Some(garbage));
                garbage_message = Some(id);
            }
            Some(body) if body["Event"] == "s3:TestEvent" => {
                test_event_messages.insert(id);
            }
            Some(body) => {
                let buckets: BTreeSet<String> = body["Records"]
                    .as_array()
                    .ok_or_else(|| format!("unexpected body {body}"))?
                    .iter()
                    .filter_map(|r| r["s3"]["bucket"]["name"].as_str().map(str::to_string))
                    .collect();
                if buckets.len() > 1 {
                    mixed_message = Some(id.clone());
                }
                object_messages.insert(id, buckets);
            }
        }
    }
    assert_eq!(test_event_messages.len(), 2);
    assert_eq!(
        object_messages.len(),
        KEYS_A.len() + KEYS_B.len() + usize::from(with_mixed)
    );
    assert_eq!(mixed_message.is_some(), with_mixed);
    let event = lambda_sqs_event(&messages, &stack.events_queue_arn().await?);
    Ok(IngestBatch {
        bucket_a,
        bucket_b,
        event,
        object_messages,
        test_event_messages,
        garbage_message: garbage_message.ok_or("garbage not received")?,
        mixed_message,
        messages,
    })
}

#[tokio::test]
async fn an_sqs_batch_from_the_ingest_queue_costs_one_write_per_bucket() -> Result<(), BoxError> {
    let (stack, dynamodb) = counted_stack(30).await?;
    let batch = ingest_batch(&stack, false).await?;
    dynamodb.reset();

    let answer = response(stack.aggregator.invoke(batch.event.clone()).await?);
    assert_eq!(answer, json!({"batchItemFailures": []}));

    // A cold container: one consistent read and one write (the open) per bucket.
    assert_eq!(
        dynamodb.counts(),
        BTreeMap::from([
            ("DynamoDB_20120810.GetItem".to_string(), 2),
            ("DynamoDB_20120810.UpdateItem".to_string(), 2),
        ])
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 2),
        "one delayed refresh message per bucket"
    );
    assert_eq!(folders(&stack, &batch.bucket_a).await?, strings(&FOLDERS_A));
    assert_eq!(folders(&stack, &batch.bucket_b).await?, strings(&FOLDERS_B));
    for bucket in [&batch.bucket_a, &batch.bucket_b] {
        let item = stack
            .clients
            .bucket_item(&stack.table, bucket)
            .await?
            .ok_or("no item")?;
        assert_eq!(item["Generation"].as_n().map_err(|_| "Generation")?, "1");
        assert_eq!(
            item["SentGeneration"]
                .as_n()
                .map_err(|_| "SentGeneration")?,
            "1"
        );
    }
    // The unreadable message is logged, with its id, and not retried.
    let dropped = stack
        .aggregator
        .output_lines()
        .into_iter()
        .find(|l| l.contains("Dropping a record that can never be processed"))
        .ok_or("the garbage message was not logged")?;
    assert!(dropped.contains(&batch.garbage_message), "{dropped}");
    assert_eq!(
        stack
            .aggregator
            .output_lines()
            .iter()
            .filter(|l| l.contains("Dropping a record"))
            .count(),
        1
    );
    for id in &batch.test_event_messages {
        assert!(!dropped.contains(id.as_str()));
    }

    // The same batch delivered again (SQS is at-least-once): the windows cover it.
    dynamodb.reset();
    let again = response(stack.aggregator.invoke(batch.event.clone()).await?);
    assert_eq!(again, json!({"batchItemFailures": []}));
    assert_eq!(dynamodb.count("UpdateItem"), 0, "{:?}", dynamodb.counts());
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 2)
    );
    Ok(())
}

#[tokio::test]
async fn with_the_action_queue_gone_exactly_the_messages_with_object_events_fail(
) -> Result<(), BoxError> {
    let (stack, dynamodb) = counted_stack(30).await?;
    let batch = ingest_batch(&stack, false).await?;
    stack
        .clients
        .sqs
        .delete_queue()
        .queue_url(&stack.action_queue_url)
        .send()
        .await?;
    dynamodb.reset();

    let answer = response(stack.aggregator.invoke(batch.event.clone()).await?);
    let failed = failed_ids(&answer);
    let objects: BTreeSet<String> = batch.object_messages.keys().cloned().collect();
    assert_eq!(failed, objects, "{answer}");
    assert!(failed.is_disjoint(&batch.test_event_messages));
    assert!(!failed.contains(&batch.garbage_message));
    // The message goes before the write that opens a window: no window without one.
    assert_eq!(dynamodb.count("UpdateItem"), 0, "{:?}", dynamodb.counts());
    for bucket in [&batch.bucket_a, &batch.bucket_b] {
        assert!(stack
            .clients
            .bucket_item(&stack.table, bucket)
            .await?
            .is_none());
    }
    assert!(stack
        .aggregator
        .output_contains("Failed to record events; their messages will be redelivered"));

    // The queue comes back and SQS redelivers the failed messages.
    let url = stack
        .clients
        .create_queue(
            stack
                .action_queue_url
                .rsplit('/')
                .next()
                .ok_or("queue URL without a name")?,
        )
        .await?;
    assert_eq!(url, stack.action_queue_url);
    let redelivered: Vec<Message> = batch
        .messages
        .iter()
        .filter(|m| m.message_id().is_some_and(|id| failed.contains(id)))
        .cloned()
        .collect();
    assert_eq!(redelivered.len(), objects.len());
    let event = lambda_sqs_event(&redelivered, &stack.events_queue_arn().await?);
    let answer = response(stack.aggregator.invoke(event).await?);
    assert_eq!(answer, json!({"batchItemFailures": []}));
    assert_eq!(dynamodb.count("UpdateItem"), 2, "{:?}", dynamodb.counts());
    assert_eq!(folders(&stack, &batch.bucket_a).await?, strings(&FOLDERS_A));
    assert_eq!(folders(&stack, &batch.bucket_b).await?, strings(&FOLDERS_B));
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 2)
    );
    Ok(())
}

#[tokio::test]
async fn a_bucket_that_cannot_be_recorded_fails_only_the_messages_that_carry_it(
) -> Result<(), BoxError> {
    let (stack, dynamodb) = counted_stack(30).await?;
    let batch = ingest_batch(&stack, true).await?;
    let mixed = batch.mixed_message.clone().ok_or("no mixed message")?;
    // Bucket A already has an open window with its message sent (one event of it,
    // straight from S3), so its events only need a join; bucket B needs a new window,
    // whose message cannot be sent.
    stack
        .clients
        .put_object(&batch.bucket_a, "a0/first.txt")
        .await?;
    let first = stack.collect_s3_events(1).await?.remove(0);
    let opened = response(stack.aggregator.invoke(first).await?);
    assert_eq!(count(&opened, "windowsOpened"), 1, "{opened}");
    stack
        .clients
        .sqs
        .delete_queue()
        .queue_url(&stack.action_queue_url)
        .send()
        .await?;
    dynamodb.reset();

    let answer = response(stack.aggregator.invoke(batch.event.clone()).await?);
    let failed = failed_ids(&answer);
    let expected = batch.object_ids(&batch.bucket_b);
    assert!(expected.contains(&mixed));
    assert_eq!(expected.len(), KEYS_B.len() + 1);
    assert_eq!(failed, expected, "{answer}");
    // Bucket A's events were recorded: one join, with every folder of the batch.
    assert_eq!(dynamodb.count("UpdateItem"), 1, "{:?}", dynamodb.counts());
    assert_eq!(dynamodb.count("GetItem"), 1, "only B is read: A is known");
    assert_eq!(
        folders(&stack, &batch.bucket_a).await?,
        strings(&["/a0/", "/a1/", "/a2/deep/"])
    );
    assert!(stack
        .clients
        .bucket_item(&stack.table, &batch.bucket_b)
        .await?
        .is_none());
    Ok(())
}

// ---------------------------------------------------------------------------------
// S3 → SNS, S3 → EventBridge
// ---------------------------------------------------------------------------------

/// The Lambda SNS event for an SNS notification that SNS delivered to SQS as
/// `envelope` (the same fields; Lambda spells two URLs differently).
fn lambda_sns_event(envelope: &Value, subscription_arn: &str) -> Value {
    json!({"Records": [{
        "EventSource": "aws:sns",
        "EventVersion": "1.0",
        "EventSubscriptionArn": subscription_arn,
        "Sns": {
            "Type": envelope["Type"],
            "MessageId": envelope["MessageId"],
            "TopicArn": envelope["TopicArn"],
            "Subject": envelope.get("Subject").cloned().unwrap_or(Value::Null),
            "Message": envelope["Message"],
            "Timestamp": envelope["Timestamp"],
            "SignatureVersion": envelope["SignatureVersion"],
            "Signature": envelope["Signature"],
            "SigningCertUrl": envelope["SigningCertURL"],
            "UnsubscribeUrl": envelope["UnsubscribeURL"],
            "MessageAttributes": {},
        },
    }]})
}

#[tokio::test]
async fn s3_events_through_sns_open_and_join_a_window() -> Result<(), BoxError> {
    let (stack, _dynamodb) = counted_stack(30).await?;
    // S3 → SNS topic → SQS queue (not raw: the body is the SNS envelope).
    let topic_xml = moto_query(
        &stack,
        "sns",
        &[
            ("Action", "CreateTopic"),
            ("Version", "2010-03-31"),
            ("Name", &unique_name("s3-events")),
        ],
    )
    .await?;
    let topic_arn = xml_value(&topic_xml, "TopicArn")?;
    let queue_url = stack
        .clients
        .create_queue(&unique_name("sns-events"))
        .await?;
    let queue_arn = stack.clients.queue_arn(&queue_url).await?;
    let subscription_xml = moto_query(
        &stack,
        "sns",
        &[
            ("Action", "Subscribe"),
            ("Version", "2010-03-31"),
            ("TopicArn", &topic_arn),
            ("Protocol", "sqs"),
            ("Endpoint", &queue_arn),
        ],
    )
    .await?;
    let subscription_arn = xml_value(&subscription_xml, "SubscriptionArn")?;
    let bucket = unique_name("via-sns").to_ascii_lowercase();
    stack
        .clients
        .s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await?;
    stack
        .clients
        .s3
        .put_bucket_notification_configuration()
        .bucket(&bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .topic_configurations(
                    TopicConfiguration::builder()
                        .topic_arn(&topic_arn)
                        .events("s3:ObjectCreated:*".into())
                        .events("s3:ObjectRemoved:*".into())
                        .build()?,
                )
                .build(),
        )
        .send()
        .await?;
    for key in ["sns/one/a.txt", "sns/two/b.txt"] {
        stack.clients.put_object(&bucket, key).await?;
    }
    let messages = drain_exactly(&stack, &queue_url, 3).await?;
    let envelopes: Vec<Value> = messages.iter().filter_map(body_json).collect();
    assert_eq!(envelopes.len(), 3);
    let inner = |e: &Value| -> Value {
        serde_json::from_str(e["Message"].as_str().unwrap_or_default()).unwrap_or(Value::Null)
    };
    assert!(envelopes
        .iter()
        .all(|e| e["Type"] == "Notification" && e["TopicArn"] == topic_arn.as_str()));
    let first = envelopes
        .iter()
        .position(|e| inner(e)["Records"][0]["s3"]["object"]["key"] == "sns%2Fone%2Fa.txt")
        .ok_or("no notification of sns/one/a.txt")?;
    assert!(envelopes
        .iter()
        .any(|e| inner(e)["Event"] == "s3:TestEvent"));

    // SNS → Lambda: the envelope arrives as a Lambda SNS event.
    let report = response(
        stack
            .aggregator
            .invoke(lambda_sns_event(&envelopes[first], &subscription_arn))
            .await?,
    );
    assert_eq!(report["ingest"], "Sns", "{report}");
    assert_eq!(
        (count(&report, "changes"), count(&report, "windowsOpened")),
        (1, 1),
        "{report}"
    );
    assert_eq!(folders(&stack, &bucket).await?, strings(&["/sns/one/"]));

    // SNS → SQS → Lambda: the envelopes are the bodies of an SQS batch.
    let rest: Vec<Message> = messages
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, m)| m.clone())
        .collect();
    let answer = response(
        stack
            .aggregator
            .invoke(lambda_sqs_event(&rest, &queue_arn))
            .await?,
    );
    assert_eq!(answer, json!({"batchItemFailures": []}));
    assert_eq!(
        folders(&stack, &bucket).await?,
        strings(&["/sns/one/", "/sns/two/"])
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1),
        "the second delivery joined the window"
    );
    Ok(())
}

/// An EventBridge "Object Restore Completed" event, as in the S3 User Guide
/// (EventBridge event message structure).
fn restore_completed_event(bucket: &str, key: &str) -> Value {
    json!({
        "version": "0",
        "id": "6924de0d-13e2-6bbf-c0c1-b903b753565e",
        "detail-type": "Object Restore Completed",
        "source": "aws.s3",
        "account": ACCOUNT_ID,
        "time": "2021-11-12T00:00:00Z",
        "region": REGION,
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e"
            },
            "request-id": "189F19CB7FB1B6A4",
            "requester": "s3.amazonaws.com",
            "restore-expiry-time": "2021-11-13T00:00:00Z",
            "source-storage-class": "GLACIER"
        }
    })
}

#[tokio::test]
async fn s3_events_through_eventbridge_open_a_window_and_restores_change_nothing(
) -> Result<(), BoxError> {
    let (stack, dynamodb) = counted_stack(30).await?;
    let bucket = unique_name("via-eb").to_ascii_lowercase();
    stack
        .clients
        .s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await?;
    stack
        .clients
        .s3
        .put_bucket_notification_configuration()
        .bucket(&bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .event_bridge_configuration(EventBridgeConfiguration::builder().build())
                .build(),
        )
        .send()
        .await?;
    // A rule on the default bus for this bucket's events, with an SQS queue as target.
    let queue_url = stack
        .clients
        .create_queue(&unique_name("eb-events"))
        .await?;
    let queue_arn = stack.clients.queue_arn(&queue_url).await?;
    let rule = unique_name("s3-objects");
    let pattern = json!({"source": ["aws.s3"], "detail": {"bucket": {"name": [bucket]}}});
    moto_json(
        &stack,
        "events",
        "AWSEvents.PutRule",
        json!({"Name": rule, "EventPattern": pattern.to_string(), "State": "ENABLED"}),
    )
    .await?;
    let targets = moto_json(
        &stack,
        "events",
        "AWSEvents.PutTargets",
        json!({"Rule": rule, "Targets": [{"Id": "ingest", "Arn": queue_arn}]}),
    )
    .await?;
    assert_eq!(targets["FailedEntryCount"], 0, "{targets}");

    // EventBridge keys are not URL-encoded: a '+' is a plus, a space a space.
    let key = "eb/dir/x y+z.txt";
    stack.clients.put_object(&bucket, key).await?;
    // moto also emits "Object Tags Added" for a put: another event that changes no
    // listing, delivered below with the others.
    let mut first = drain_until_quiet(&stack, &queue_url, 1).await?;
    let position = first
        .iter()
        .position(|m| body_json(m).is_some_and(|e| e["detail-type"] == "Object Created"))
        .ok_or("no Object Created event")?;
    let created = first.remove(position);
    let created = body_json(&created).ok_or("EventBridge body is not JSON")?;
    assert_eq!(created["source"], "aws.s3", "{created}");
    assert_eq!(created["detail-type"], "Object Created", "{created}");
    assert_eq!(created["detail"]["object"]["key"], key, "{created}");

    // EventBridge → Lambda: the event itself is the payload.
    dynamodb.reset();
    let report = response(stack.aggregator.invoke(created).await?);
    assert_eq!(report["ingest"], "EventBridge", "{report}");
    assert_eq!(
        (count(&report, "changes"), count(&report, "windowsOpened")),
        (1, 1),
        "{report}"
    );
    assert_eq!(folders(&stack, &bucket).await?, strings(&["/eb/dir/"]));

    // EventBridge → SQS → Lambda: an "Object Created" and an "Object Deleted".
    stack.clients.put_object(&bucket, "eb/gone/tmp.txt").await?;
    stack
        .clients
        .delete_object(&bucket, "eb/gone/tmp.txt")
        .await?;
    let mut batch = first;
    batch.extend(drain_until_quiet(&stack, &queue_url, 2).await?);
    let events: Vec<Value> = batch.iter().filter_map(body_json).collect();
    assert_eq!(events.len(), batch.len());
    let of_type = |t: &str| events.iter().filter(|e| e["detail-type"] == t).count();
    assert_eq!(
        (of_type("Object Created"), of_type("Object Deleted")),
        (1, 1),
        "{events:?}"
    );
    let unchanged = events.len() - 2;
    assert!(events.iter().all(|e| e["source"] == "aws.s3"));
    let answer = response(
        stack
            .aggregator
            .invoke(lambda_sqs_event(&batch, &queue_arn))
            .await?,
    );
    assert_eq!(answer, json!({"batchItemFailures": []}));
    assert_eq!(
        folders(&stack, &bucket).await?,
        strings(&["/eb/dir/", "/eb/gone/"])
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1)
    );

    let not_listing_changes = || {
        stack
            .aggregator
            .output_lines()
            .iter()
            .filter(|l| l.contains("event does not change a listing"))
            .count()
    };
    assert_eq!(not_listing_changes(), unchanged);

    // A restore changes no listing: no write, no message, no new folder.
    let writes_before = dynamodb.count("UpdateItem");
    let report = response(
        stack
            .aggregator
            .invoke(restore_completed_event(&bucket, "eb/restored/obj.bin"))
            .await?,
    );
    assert_eq!(report["ingest"], "EventBridge", "{report}");
    assert_eq!(
        (
            count(&report, "changes"),
            count(&report, "skippedNotListingChanges"),
            count(&report, "windowWrites"),
            count(&report, "messagesSent"),
            count(&report, "windowsOpened"),
            count(&report, "windowsJoined"),
        ),
        (0, 1, 0, 0, 0, 0),
        "{report}"
    );
    assert_eq!(dynamodb.count("UpdateItem"), writes_before);
    assert_eq!(
        folders(&stack, &bucket).await?,
        strings(&["/eb/dir/", "/eb/gone/"])
    );
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1)
    );
    assert!(stack
        .aggregator
        .output_contains("\"Object Restore Completed\" event does not change a listing"));
    assert_eq!(not_listing_changes(), unchanged + 1);
    Ok(())
}
