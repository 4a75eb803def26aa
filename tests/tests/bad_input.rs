//! The catalogue of bad inputs, sent through the compiled binaries under the Lambda
//! Runtime API harness (moto and the Storage Gateway stand-in behind them). For each
//! case the test checks the outcome below, one log line with the phrase below, what
//! reached DynamoDB, SQS and the stand-in, and that the process stays up: a valid
//! invocation right after it succeeds.
//!
//! Aggregator (S3 event notifications). "Failed" means the invocation returns an
//! error, so Lambda retries it and then keeps it in the function's on-failure
//! destination / DLQ. "Skipped" records are answered with a report, not retried.
//!
//! | case | outcome | log line |
//! |---|---|---|
//! | `{}` | failed, `Aggregator.NotAnS3Notification` | ERROR `Rejecting event` … `no "Records" array` (then the Lambda runtime's own `ERROR NotANotification(…)`) |
//! | `{"Records": "x"}` (also `null`, an object) | failed, `Aggregator.NotAnS3Notification` | ERROR `Rejecting event` … `"Records" is a string, not an array` |
//! | not an object (`[1,2,3]`, `null`, `"text"`) | failed, `Aggregator.NotAnS3Notification` | ERROR `Rejecting event` … `expected a JSON object, got an array` |
//! | a record that is `null` or not an object | record skipped (`skippedMalformed`) | WARN `Skipping malformed record: record is not an object` |
//! | a record with no `s3`, or `"s3": null` | record skipped | WARN `Skipping malformed record: no "s3" section` |
//! | `s3.bucket` or its `name` missing, `null` or not a string | record skipped | WARN `Skipping malformed record: no s3.bucket.name` |
//! | `s3.object` or its `key` missing or `null` | record skipped | WARN `Skipping malformed record: no s3.object.key` |
//! | a bucket name that is not a valid bucket (`Not_A_Bucket`, `ab`, 64 characters, `a/b`, empty) | record skipped | WARN `Skipping malformed record: invalid bucket name "…"` |
//! | a malformed record next to a good one | the good one is processed, the bad one skipped | WARN `Skipping malformed record: …` |
//! | `eventTime` missing, `null`, not ISO 8601, a negative year, year 99999, a number | processed: the window opens; the message's `timestamp` is the processing time | INFO `Sending refresh request for bucket: B, timestamp: T` |
//! | `eventTime` of the year 1 (parseable, far in the past) | processed; `timestamp` is that time | INFO `Sending refresh request for bucket: B, timestamp: -62135596800000` |
//! | `eventName` missing, `userIdentity` `null`, `principalId` a number | processed (not a gateway write) | INFO `Sending refresh request for bucket: B` |
//! | a 1,100-byte key (S3's limit is 1,024) | processed; its folder is recorded | INFO `Sending refresh request for bucket: B` |
//! | invalid percent-encoding (`a%zzb`, `x%`, `x%4`) or `%FF` (not UTF-8) | processed as a change of the whole bucket: every share of the bucket is refreshed | WARN `Key cannot be decoded; its bucket's shares will be refreshed in full` … `raw_key=…` |
//! | `+` in a key (`dir+one/a+b`) | decoded to a space (`dir one/a b`); `%2B` decodes to `+` | INFO `Sending refresh request for bucket: B` |
//!
//! Refresher (Lambda SQS events). A record in `batchItemFailures` is redelivered by
//! SQS (and ends in the queue's DLQ after its receive limit); a discarded record is
//! logged with its content and deleted, because no retry can make it readable.
//!
//! | case | outcome | log line |
//! |---|---|---|
//! | `{}`, `{"Records": "x"}`, `[1,2]` | failed, `Refresher.NotAnSqsEvent`: no record can be reported (only a misrouted invocation sends this; its caller gets the error) | ERROR `NotAnSqsEvent("{}")`: the Lambda runtime's line; the refresher writes none of its own |
//! | a record without `attributes` and `messageAttributes`, our body | processed from the body: the window's shares are refreshed | INFO `Refreshing cache of share` |
//! | a record without attributes, body not JSON; or `attributes`/`messageAttributes` `null` and no body | discarded (not retried) | ERROR `Discarding unreadable refresh message` … `names no bucket` (with the body) |
//! | a `bucket-name` attribute, body not JSON, not ours (`{"hello":…}`) or empty | the whole bucket is refreshed | WARN `Message body is not ours; refreshing the whole bucket` |
//! | a record that is not an object | discarded | ERROR `Discarding unreadable refresh message` … `SQS record is not a message` |
//! | a record without `messageId` | discarded (it cannot be reported in `batchItemFailures`) | ERROR `Discarding unreadable refresh message` … `no messageId` |
//! | a `bucket-name` that is not a valid bucket | the whole "bucket" is refreshed: no share maps it | WARN `No file share maps bucket …; nothing to refresh` |
//! | a `timestamp` attribute (or body `timestampMs`) of `i64::MIN` | refreshed as usual; the event age saturates instead of overflowing (`refresher_survives_an_extreme_timestamp`) | INFO `Refreshing cache of share` |

use aws_sdk_sqs::types::Message;
use integration_tests::aws::{lambda_sqs_event, BoxError};
use integration_tests::runtime_api::{Invocation, LambdaProcess};
use integration_tests::sgw_standin::ShareKind;
use integration_tests::stack::{action_message_kind, ActionMessageKind, Stack, StackOptions};
use serde_json::{json, Value};
use shared::s3_event::parse_event_time;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// Windows of 0 s: every processed record opens a window and its message is visible
/// at once, so each case can be checked on the queue right away.
async fn stack() -> Result<Stack, BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 0,
        ..Default::default()
    })
    .await?;
    // Refreshes finish at once: the cases refresh the same shares in quick succession,
    // and the two-in-flight limit is not what these tests are about.
    stack.gateway.set_refresh_duration(Duration::ZERO);
    // The queue that the hand-made records name as their source (`sqs_record`): the
    // refresher sends wake-ups back to it, as to any record's queue.
    stack
        .clients
        .create_queue("S3EventAggregatorActionQueue")
        .await?;
    Ok(stack)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A bucket name no other case uses (valid, but no real bucket: the aggregator does
/// not look buckets up).
fn bucket_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "bad-input-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An S3 record as AWS sends it.
fn record(bucket: &str, key: &str) -> Value {
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "s3-event-aggregator",
            "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
            "object": {"key": key, "size": 5, "eTag": "5d41402abc4b2a76b9719d911017c592", "sequencer": "0055AED6DCD90281E5"}
        }
    })
}

/// Removes `field` from the object at the JSON pointer `parent` ("" is the root).
fn remove_field(value: &mut Value, parent: &str, field: &str) {
    if let Some(Value::Object(object)) = value.pointer_mut(parent) {
        object.remove(field);
    }
}

fn notification(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}

/// Waits for a line after `from` that contains every part; returns it.
async fn expect_line(
    process: &LambdaProcess,
    from: usize,
    parts: &[&str],
) -> Result<String, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = process.output_lines();
        if let Some(line) = lines
            .get(from..)
            .unwrap_or_default()
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return Ok(line.clone());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no log line with {parts:?}; lines since the case: {:#?}",
                lines.get(from..).unwrap_or_default()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lines_with(process: &LambdaProcess, from: usize, parts: &[&str]) -> usize {
    process
        .output_lines()
        .get(from..)
        .unwrap_or_default()
        .iter()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

fn field(report: &Value, name: &str) -> u64 {
    report[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

/// Every refresh message now on the action queue (deleted as read), after waiting for
/// `expected` of them. The gateway's refresh-complete events that reach the queue
/// meanwhile (from the cases' refreshes) are deleted unread: these tests are about
/// the messages that the aggregator sends.
async fn take_messages(stack: &Stack, expected: usize) -> Result<Vec<Message>, BoxError> {
    let refreshes_only = |batch: Vec<Message>| -> Vec<Message> {
        batch
            .into_iter()
            .filter(|m| {
                action_message_kind(m.body().unwrap_or_default()) == ActionMessageKind::Refresh
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut messages = Vec::new();
    while messages.len() < expected && Instant::now() < deadline {
        let batch = stack
            .clients
            .drain(&stack.action_queue_url, 1, Duration::from_secs(1))
            .await?;
        messages.extend(refreshes_only(batch));
    }
    assert_eq!(messages.len(), expected, "messages on the action queue");
    let rest = refreshes_only(
        stack
            .clients
            .drain(&stack.action_queue_url, 10, Duration::from_secs(1))
            .await?,
    );
    assert!(
        rest.is_empty(),
        "no other message on the action queue: {rest:?}"
    );
    Ok(messages)
}

fn attribute<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .message_attributes()
        .and_then(|a| a.get(name))
        .and_then(|a| a.string_value())
}

async fn table_items(stack: &Stack) -> Result<usize, BoxError> {
    let out = stack
        .clients
        .dynamodb
        .scan()
        .table_name(&stack.table)
        .send()
        .await?;
    Ok(out.items().len())
}

async fn folders_of(stack: &Stack, bucket: &str) -> Result<(Vec<String>, bool), BoxError> {
    let item = stack
        .clients
        .bucket_item(&stack.table, bucket)
        .await?
        .ok_or_else(|| format!("no window item for {bucket}"))?;
    let mut folders = item
        .get("Folders")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    folders.sort();
    let whole = item
        .get("WholeBucket")
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false);
    Ok((folders, whole))
}

/// The follow-up that shows the aggregator is still up: a good record opens a window
/// and sends its message.
async fn aggregator_still_works(stack: &Stack, case: &str) -> Result<(), BoxError> {
    assert!(
        !stack.aggregator.has_exited(),
        "{case}: the aggregator exited"
    );
    let bucket = bucket_name("ok");
    let from = stack.aggregator.output_lines().len();
    match stack
        .aggregator
        .invoke(notification(vec![record(&bucket, "ok.txt")]))
        .await?
    {
        Invocation::Response(report) => {
            assert_eq!(field(&report, "messagesSent"), 1, "{case}: {report}")
        }
        other => panic!("{case}: the next valid invocation failed: {other:?}"),
    }
    expect_line(
        &stack.aggregator,
        from,
        &[&format!("Sending refresh request for bucket: {bucket}")],
    )
    .await?;
    let sent = take_messages(stack, 1).await?;
    assert_eq!(attribute(&sent[0], "bucket-name"), Some(bucket.as_str()));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Aggregator
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn aggregator_fails_payloads_that_are_not_notifications() -> Result<(), BoxError> {
    let stack = stack().await?;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("{}", json!({}), "no \"Records\" array"),
        (
            "Records is a string",
            json!({"Records": "x"}),
            "\"Records\" is a string, not an array",
        ),
        (
            "Records is null",
            json!({"Records": null}),
            "\"Records\" is null, not an array",
        ),
        (
            "Records is an object",
            json!({"Records": {"0": record("b-1", "k")}}),
            "\"Records\" is an object, not an array",
        ),
        (
            "an array",
            json!([1, 2, 3]),
            "expected a JSON object, got an array",
        ),
        ("null", Value::Null, "expected a JSON object, got null"),
        (
            "a string",
            json!("text"),
            "expected a JSON object, got a string",
        ),
    ];
    for (case, payload, reason) in cases {
        let items = table_items(&stack).await?;
        let from = stack.aggregator.output_lines().len();
        match stack.aggregator.invoke(payload).await? {
            Invocation::Error { error_type, .. } => {
                assert_eq!(error_type, "Aggregator.NotAnS3Notification", "{case}")
            }
            other => panic!("{case}: expected a failed invocation, got {other:?}"),
        }
        let parts = ["ERROR", "Rejecting event", reason];
        expect_line(&stack.aggregator, from, &parts).await?;
        assert_eq!(
            table_items(&stack).await?,
            items,
            "{case}: no DynamoDB write"
        );
        take_messages(&stack, 0).await?;
        aggregator_still_works(&stack, case).await?;
        assert_eq!(lines_with(&stack.aggregator, from, &parts), 1, "{case}");
    }
    Ok(())
}

#[tokio::test]
async fn aggregator_skips_malformed_records() -> Result<(), BoxError> {
    let stack = stack().await?;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = record("skipped-bucket", "k");
        f(&mut r);
        r
    };
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "a null record",
            Value::Null,
            "record is not an object".into(),
        ),
        (
            "a string record",
            json!("x"),
            "record is not an object".into(),
        ),
        ("an empty record", json!({}), "no \"s3\" section".into()),
        (
            "s3 missing",
            with(&|r| remove_field(r, "", "s3")),
            "no \"s3\" section".into(),
        ),
        (
            "s3 null",
            with(&|r| r["s3"] = Value::Null),
            "no \"s3\" section".into(),
        ),
        (
            "bucket missing",
            with(&|r| remove_field(r, "/s3", "bucket")),
            "no s3.bucket.name".into(),
        ),
        (
            "bucket name null",
            with(&|r| r["s3"]["bucket"]["name"] = Value::Null),
            "no s3.bucket.name".into(),
        ),
        (
            "bucket name a number",
            with(&|r| r["s3"]["bucket"]["name"] = json!(42)),
            "no s3.bucket.name".into(),
        ),
        (
            "object missing",
            with(&|r| remove_field(r, "/s3", "object")),
            "no s3.object.key".into(),
        ),
        (
            "key null",
            with(&|r| r["s3"]["object"]["key"] = Value::Null),
            "no s3.object.key".into(),
        ),
    ];
    let bad_buckets = ["Not_A_Bucket", "ab", &"b".repeat(64), "bucket/key", ""];
    let mut cases = cases;
    for name in bad_buckets {
        cases.push((
            "a bucket name that is not a valid bucket",
            record(name, "k"),
            format!("invalid bucket name {name:?}"),
        ));
    }
    for (case, bad, detail) in &cases {
        let items = table_items(&stack).await?;
        let from = stack.aggregator.output_lines().len();
        let report = match stack
            .aggregator
            .invoke(notification(vec![bad.clone()]))
            .await?
        {
            Invocation::Response(report) => report,
            other => panic!("{case}: a malformed record is skipped, got {other:?}"),
        };
        assert_eq!(field(&report, "skippedMalformed"), 1, "{case}: {report}");
        assert_eq!(field(&report, "changes"), 0, "{case}: {report}");
        assert_eq!(field(&report, "messagesSent"), 0, "{case}: {report}");
        let phrase = format!("Skipping malformed record: {detail}");
        let parts = ["WARN", phrase.as_str()];
        expect_line(&stack.aggregator, from, &parts).await?;
        assert_eq!(
            table_items(&stack).await?,
            items,
            "{case}: no DynamoDB write"
        );
        take_messages(&stack, 0).await?;
        aggregator_still_works(&stack, case).await?;
        assert_eq!(lines_with(&stack.aggregator, from, &parts), 1, "{case}");
    }

    // A malformed record does not hold up the good ones next to it.
    let good = bucket_name("next-to-bad");
    let from = stack.aggregator.output_lines().len();
    let mixed = notification(vec![json!({}), record(&good, "k"), Value::Null]);
    let report = stack.aggregator.invoke(mixed).await?;
    let report = report.response().ok_or("the mixed batch failed")?;
    assert_eq!(field(report, "skippedMalformed"), 2, "{report}");
    assert_eq!(field(report, "messagesSent"), 1, "{report}");
    expect_line(&stack.aggregator, from, &["Skipping malformed record"]).await?;
    let sent = take_messages(&stack, 1).await?;
    assert_eq!(attribute(&sent[0], "bucket-name"), Some(good.as_str()));
    Ok(())
}

#[tokio::test]
async fn aggregator_processes_records_whose_other_fields_are_odd() -> Result<(), BoxError> {
    let stack = stack().await?;
    type Edit = Box<dyn Fn(&mut Value)>;
    let event_time =
        |t: Value| -> Edit { Box::new(move |r: &mut Value| r["eventTime"] = t.clone()) };
    let cases: Vec<(&str, Edit)> = vec![
        (
            "eventTime missing",
            Box::new(|r| remove_field(r, "", "eventTime")),
        ),
        ("eventTime null", event_time(Value::Null)),
        (
            "eventTime not ISO 8601",
            event_time(json!("Sun, 12 Aug 2018 18:14:02 GMT")),
        ),
        (
            "eventTime a negative year",
            event_time(json!("-0001-01-01T00:00:00Z")),
        ),
        (
            "eventTime year 99999",
            event_time(json!("99999-01-01T00:00:00Z")),
        ),
        (
            "eventTime the year 1",
            event_time(json!("0001-01-01T00:00:00Z")),
        ),
        (
            "eventTime a number",
            event_time(json!(1_534_097_642_149_i64)),
        ),
        ("eventTime an empty string", event_time(json!(""))),
        (
            "eventName missing",
            Box::new(|r| remove_field(r, "", "eventName")),
        ),
        (
            "userIdentity null",
            Box::new(|r| r["userIdentity"] = Value::Null),
        ),
        (
            "principalId a number",
            Box::new(|r| r["userIdentity"]["principalId"] = json!(7)),
        ),
    ];
    for (case, edit) in &cases {
        let bucket = bucket_name("odd");
        let mut odd = record(&bucket, "dir/k");
        edit(&mut odd);
        // The code's rule: the timestamp is the event's time when it can be read.
        let parsed = odd["eventTime"].as_str().and_then(parse_event_time);
        let from = stack.aggregator.output_lines().len();
        let before = now_ms();
        let report = match stack.aggregator.invoke(notification(vec![odd])).await? {
            Invocation::Response(report) => report,
            other => panic!("{case}: expected the record to be processed, got {other:?}"),
        };
        let after = now_ms();
        assert_eq!(field(&report, "changes"), 1, "{case}: {report}");
        assert_eq!(field(&report, "windowsOpened"), 1, "{case}: {report}");
        assert_eq!(field(&report, "messagesSent"), 1, "{case}: {report}");
        let sent = take_messages(&stack, 1).await?;
        assert_eq!(attribute(&sent[0], "bucket-name"), Some(bucket.as_str()));
        let timestamp: i64 = attribute(&sent[0], "timestamp")
            .ok_or("no timestamp")?
            .parse()?;
        match parsed {
            Some(t) => assert_eq!(timestamp, t, "{case}"),
            None => assert!(
                (before..=after).contains(&timestamp),
                "{case}: an unreadable eventTime gives the processing time, got {timestamp}"
            ),
        }
        let phrase =
            format!("Sending refresh request for bucket: {bucket}, timestamp: {timestamp}");
        expect_line(&stack.aggregator, from, &["INFO", &phrase]).await?;
        assert_eq!(
            folders_of(&stack, &bucket).await?,
            (vec!["/dir/".to_string()], false)
        );
        aggregator_still_works(&stack, case).await?;
    }
    // The one parseable far-away time is kept as it is.
    assert_eq!(
        parse_event_time("0001-01-01T00:00:00Z"),
        Some(-62_135_596_800_000)
    );
    Ok(())
}

#[tokio::test]
async fn aggregator_decodes_or_widens_unusual_keys() -> Result<(), BoxError> {
    let stack = stack().await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let long_name = format!("long/{}", "k".repeat(1095));
    let long_folder = format!("{}/{}", "f".repeat(600), "x".repeat(499));
    assert_eq!((long_name.len(), long_folder.len()), (1100, 1100));
    // (case, raw key, folders recorded, whole bucket)
    let cases: Vec<(&str, String, Vec<String>, bool)> = vec![
        ("a 1,100-byte key", long_name, vec!["/long/".into()], false),
        (
            "a 1,100-byte key with a long folder",
            long_folder,
            vec![format!("/{}/", "f".repeat(600))],
            false,
        ),
        (
            "+ in a key",
            "dir+one/a+b.txt".into(),
            vec!["/dir one/".into()],
            false,
        ),
        (
            "%2B in a key",
            "plus%2Bsign/x".into(),
            vec!["/plus+sign/".into()],
            false,
        ),
        ("an invalid escape", "dir/a%zzb".into(), vec![], true),
        ("a truncated escape", "dir/x%".into(), vec![], true),
        ("a one-digit escape", "dir/x%4".into(), vec![], true),
        (
            "an escape that is not UTF-8",
            "dir/%FF%FE".into(),
            vec![],
            true,
        ),
    ];
    // Shares for every case first: the refresher caches the share map. Each bucket
    // has one at its root, "dir one/" (what '+' means), "dir+one/" (what it does not
    // mean) and an unrelated prefix.
    struct Shares {
        root: String,
        spaced: String,
        plussed: String,
        elsewhere: String,
    }
    let mut prepared = Vec::new();
    for case in cases {
        let bucket = bucket_name("key");
        let arn = |p: &str| format!("arn:aws:s3:::{bucket}/{p}");
        let shares = Shares {
            root: stack
                .gateway
                .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}")),
            spaced: stack
                .gateway
                .add_share(&gw, ShareKind::Nfs, &arn("dir one/")),
            plussed: stack
                .gateway
                .add_share(&gw, ShareKind::Smb, &arn("dir+one/")),
            elsewhere: stack
                .gateway
                .add_share(&gw, ShareKind::Smb, &arn("elsewhere/")),
        };
        prepared.push((case, bucket, shares));
    }
    for ((case, key, folders, whole), bucket, shares) in prepared {
        let Shares {
            root,
            spaced,
            plussed,
            elsewhere,
        } = shares;
        let from = stack.aggregator.output_lines().len();
        let report = match stack
            .aggregator
            .invoke(notification(vec![record(&bucket, &key)]))
            .await?
        {
            Invocation::Response(report) => report,
            other => panic!("{case}: expected the record to be processed, got {other:?}"),
        };
        assert_eq!(field(&report, "changes"), 1, "{case}: {report}");
        assert_eq!(field(&report, "messagesSent"), 1, "{case}: {report}");
        assert_eq!(
            field(&report, "undecodableKeys"),
            u64::from(whole),
            "{case}: {report}"
        );
        let parts: Vec<String> = if whole {
            vec![
                "WARN".into(),
                "Key cannot be decoded; its bucket's shares will be refreshed in full".into(),
                format!("raw_key={key}"),
            ]
        } else {
            vec![format!("Sending refresh request for bucket: {bucket}")]
        };
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        expect_line(&stack.aggregator, from, &parts).await?;
        assert_eq!(
            folders_of(&stack, &bucket).await?,
            (folders.clone(), whole),
            "{case}"
        );

        // The message reaches the shares the key concerns.
        let messages = take_messages(&stack, 1).await?;
        stack.gateway.reset_calls();
        let event = lambda_sqs_event(&messages, &stack.action_queue_arn);
        let response = stack.refresher.invoke(event).await?;
        let response = response.response().ok_or("the refresher failed")?;
        assert_eq!(response["batchItemFailures"], json!([]), "{case}");
        let mut refreshed: Vec<String> = stack
            .gateway
            .refreshes()
            .into_iter()
            .map(|r| r.share_arn)
            .collect();
        refreshed.sort();
        let mut expected = vec![root.clone()];
        if whole {
            expected.extend([spaced.clone(), plussed.clone(), elsewhere.clone()]);
        } else if folders.iter().any(|f| f.starts_with("/dir one/")) {
            expected.push(spaced.clone());
        }
        expected.sort();
        assert_eq!(refreshed, expected, "{case}");
        aggregator_still_works(&stack, case).await?;
        if whole {
            assert_eq!(lines_with(&stack.aggregator, from, &parts), 1, "{case}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Refresher
// ---------------------------------------------------------------------------------

/// One record of a Lambda SQS event.
fn sqs_record(id: &str, bucket_attribute: Option<&str>, body: Option<&str>) -> Value {
    let mut record = json!({
        "messageId": id,
        "receiptHandle": format!("rh-{id}"),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1767225600000"},
        "messageAttributes": {},
        "md5OfBody": "00000000000000000000000000000000",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:S3EventAggregatorActionQueue",
        "awsRegion": "us-east-1"
    });
    if let Some(bucket) = bucket_attribute {
        record["messageAttributes"] = json!({"bucket-name": {
            "stringValue": bucket, "stringListValues": [], "binaryListValues": [], "dataType": "String"}});
    }
    if let Some(body) = body {
        record["body"] = json!(body);
    }
    record
}

fn batch_failures(invocation: &Invocation) -> Vec<String> {
    let response = invocation
        .response()
        .unwrap_or_else(|| panic!("the refresher failed: {invocation:?}"));
    response["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not a batch response: {response}"))
        .iter()
        .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_string))
        .collect()
}

/// The follow-up that shows the refresher is still up: a readable message for the
/// bucket behind `share` refreshes it.
async fn refresher_still_works(
    stack: &Stack,
    case: &str,
    bucket: &str,
    share: &str,
) -> Result<(), BoxError> {
    assert!(
        !stack.refresher.has_exited(),
        "{case}: the refresher exited"
    );
    // The earlier cases' refreshes complete and their events free the share's slots.
    stack.settle(Duration::from_secs(20)).await?;
    let before = stack.gateway.refreshes().len();
    let id = format!("ok-{}", bucket_name("m"));
    let event = json!({"Records": [sqs_record(&id, Some(bucket), None)]});
    let invocation = stack.refresher.invoke(event).await?;
    assert!(batch_failures(&invocation).is_empty(), "{case}");
    let refreshes = stack.gateway.refreshes();
    assert_eq!(
        refreshes.len(),
        before + 1,
        "{case}: the next message refreshes"
    );
    assert_eq!(refreshes[before].share_arn, share, "{case}");
    Ok(())
}

#[tokio::test]
async fn refresher_rejects_a_payload_that_is_not_an_sqs_event() -> Result<(), BoxError> {
    let stack = stack().await?;
    let ok_bucket = bucket_name("ok");
    let gw = stack.gateway.add_gateway("gw-1");
    let ok_share =
        stack
            .gateway
            .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{ok_bucket}"));
    for (case, payload, logged) in [
        ("{}", json!({}), r#"NotAnSqsEvent("{}")"#),
        (
            "Records is a string",
            json!({"Records": "x"}),
            r#"NotAnSqsEvent("{\"Records\":\"x\"}")"#,
        ),
        ("an array", json!([1, 2]), r#"NotAnSqsEvent("[1,2]")"#),
    ] {
        let from = stack.refresher.output_lines().len();
        match stack.refresher.invoke(payload).await? {
            Invocation::Error {
                error_type,
                error_message,
            } => {
                assert_eq!(error_type, "Refresher.NotAnSqsEvent", "{case}");
                assert!(
                    error_message.contains("not an SQS event"),
                    "{case}: {error_message}"
                );
            }
            other => panic!("{case}: expected a failed invocation, got {other:?}"),
        }
        // The refresher writes no line of its own here: the one line is the Lambda
        // runtime's report of the handler's error (lambda_runtime's CatchPanic layer
        // logs every handler error with `{error:?}`).
        let parts = ["ERROR", logged];
        expect_line(&stack.refresher, from, &parts).await?;
        assert!(stack.gateway.calls().is_empty(), "{case}");
        refresher_still_works(&stack, case, &ok_bucket, &ok_share).await?;
        assert_eq!(lines_with(&stack.refresher, from, &parts), 1, "{case}");
        stack.gateway.reset_calls();
    }
    Ok(())
}

#[tokio::test]
async fn refresher_handles_each_unreadable_or_odd_message() -> Result<(), BoxError> {
    let stack = stack().await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let ok_bucket = bucket_name("ok");
    let ok_share =
        stack
            .gateway
            .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{ok_bucket}"));
    let bucket = bucket_name("target");
    let root = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
    let prefixed = stack.gateway.add_share(
        &gw,
        ShareKind::Smb,
        &format!("arn:aws:s3:::{bucket}/elsewhere/"),
    );

    // A real message of the pipeline, for the case without attributes.
    let opened = stack
        .aggregator
        .invoke(notification(vec![record(&bucket, "dir/k")]))
        .await?;
    assert_eq!(
        field(
            opened.response().ok_or("aggregator failed")?,
            "messagesSent"
        ),
        1
    );
    let real = take_messages(&stack, 1).await?;
    let mut without_attributes =
        lambda_sqs_event(&real, &stack.action_queue_arn)["Records"][0].clone();
    let object = without_attributes.as_object_mut().ok_or("not an object")?;
    object.remove("attributes");
    object.remove("messageAttributes");

    struct Case {
        name: &'static str,
        record: Value,
        /// Shares refreshed; `None`: discarded, the stand-in is not called at all.
        refreshed: Option<Vec<String>>,
        level: &'static str,
        phrase: Vec<String>,
    }
    let not_ours = "Message body is not ours; refreshing the whole bucket".to_string();
    let discarded = "Discarding unreadable refresh message".to_string();
    let whole = Some(vec![root.clone(), prefixed.clone()]);
    let cases = vec![
        Case {
            name: "no attributes, our body",
            record: without_attributes,
            refreshed: Some(vec![root.clone()]),
            level: "INFO",
            phrase: vec![format!(
                "Refreshing cache of share {root} for bucket: {bucket}"
            )],
        },
        Case {
            name: "no attributes, a body that is not JSON",
            record: sqs_record("m-no-attr-text", None, Some("refresh please")),
            refreshed: None,
            level: "ERROR",
            phrase: vec![
                discarded.clone(),
                "names no bucket".into(),
                "refresh please".into(),
            ],
        },
        Case {
            name: "attributes null, no body",
            record: {
                let mut r = sqs_record("m-null-attr", None, None);
                r["attributes"] = Value::Null;
                r["messageAttributes"] = Value::Null;
                r
            },
            refreshed: None,
            level: "ERROR",
            phrase: vec![discarded.clone(), "names no bucket".into()],
        },
        Case {
            name: "a bucket attribute, a body that is not JSON",
            record: sqs_record("m-text", Some(&bucket), Some("{not json")),
            refreshed: whole.clone(),
            level: "WARN",
            phrase: vec![not_ours.clone(), "{not json".into()],
        },
        Case {
            name: "a bucket attribute, JSON that is not ours",
            record: sqs_record("m-foreign", Some(&bucket), Some(r#"{"hello":"world"}"#)),
            refreshed: whole.clone(),
            level: "WARN",
            phrase: vec![not_ours.clone(), "hello".into()],
        },
        Case {
            name: "a bucket attribute, an empty body",
            record: sqs_record("m-empty", Some(&bucket), Some("")),
            refreshed: whole.clone(),
            level: "WARN",
            phrase: vec![not_ours.clone()],
        },
        Case {
            name: "a record that is not an object",
            record: json!("just a string"),
            refreshed: None,
            level: "ERROR",
            phrase: vec![discarded.clone(), "SQS record is not a message".into()],
        },
        Case {
            name: "a record without messageId",
            record: {
                let mut r = sqs_record("x", Some(&bucket), Some("{}"));
                remove_field(&mut r, "", "messageId");
                r
            },
            refreshed: None,
            level: "ERROR",
            phrase: vec![discarded.clone(), "no messageId".into()],
        },
        Case {
            name: "a bucket-name that is not a valid bucket",
            record: sqs_record("m-bad-bucket", Some("Not A Bucket!"), None),
            refreshed: Some(vec![]),
            level: "WARN",
            phrase: vec!["No file share maps bucket Not A Bucket!; nothing to refresh".into()],
        },
    ];

    for case in cases {
        let from = stack.refresher.output_lines().len();
        stack.gateway.reset_calls();
        let invocation = stack
            .refresher
            .invoke(json!({ "Records": [case.record] }))
            .await?;
        assert_eq!(
            batch_failures(&invocation),
            Vec::<String>::new(),
            "{}: nothing here is worth a retry",
            case.name
        );
        let mut refreshed: Vec<String> = stack
            .gateway
            .refreshes()
            .into_iter()
            .map(|r| r.share_arn)
            .collect();
        refreshed.sort();
        match &case.refreshed {
            None => assert!(stack.gateway.calls().is_empty(), "{}", case.name),
            Some(expected) => {
                let mut expected = expected.clone();
                expected.sort();
                assert_eq!(refreshed, expected, "{}", case.name);
            }
        }
        let mut parts: Vec<&str> = vec![case.level];
        parts.extend(case.phrase.iter().map(String::as_str));
        expect_line(&stack.refresher, from, &parts).await?;
        refresher_still_works(&stack, case.name, &ok_bucket, &ok_share).await?;
        assert_eq!(
            lines_with(&stack.refresher, from, &parts),
            1,
            "{}",
            case.name
        );
    }
    Ok(())
}

/// A `timestamp` attribute (or body `timestampMs`) is only used for the log's
/// `event_age_ms` and the OldestEventAge metric, so any value must do. One near
/// `i64::MIN` used to overflow `now - t` in `Refresher::process`: the debug build
/// panicked right after `RefreshCache` started, and SQS redelivered the whole batch,
/// refreshing again each time, until the DLQ. The age now saturates.
#[tokio::test]
async fn refresher_survives_an_extreme_timestamp() -> Result<(), BoxError> {
    let stack = stack().await?;
    let gw = stack.gateway.add_gateway("gw-1");
    // A bucket per case: each has no item yet, so the message refreshes the whole
    // bucket. Both shares exist before the refresher first lists shares.
    let cases: Vec<(&str, String, String)> = ["attribute", "body"]
        .into_iter()
        .map(|case| {
            let bucket = bucket_name(&format!("extreme-ts-{case}"));
            let share =
                stack
                    .gateway
                    .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
            (case, bucket, share)
        })
        .collect();
    for (case, bucket, share) in cases {
        let record = if case == "attribute" {
            let mut record = sqs_record("m-ts-attr", Some(&bucket), None);
            record["messageAttributes"]["timestamp"] = json!({
                "stringValue": i64::MIN.to_string(), "stringListValues": [], "binaryListValues": [], "dataType": "Number"});
            record
        } else {
            let body =
                json!({"version": 1, "bucket": bucket, "generation": 1, "windowOpenedAtMs": 0,
                "windowEndsAtMs": 0, "timestampMs": i64::MIN})
                .to_string();
            sqs_record("m-ts-body", None, Some(&body))
        };
        let before = stack.gateway.refreshes().len();
        let invocation = stack
            .refresher
            .invoke(json!({ "Records": [record] }))
            .await?;
        assert_eq!(
            batch_failures(&invocation),
            Vec::<String>::new(),
            "{case}: {invocation:?}"
        );
        assert_eq!(stack.gateway.refreshes().len(), before + 1, "{case}");
        refresher_still_works(&stack, case, &bucket, &share).await?;
    }
    Ok(())
}
