//! Property tests of the two decoders that read untrusted input: the aggregator's
//! `decode_notification` (S3 event notifications) and the refresher's
//! `decode_sqs_record` (one record of a Lambda SQS event).
//!
//! Neither may panic on any JSON: arbitrary values (a recursive strategy with bounded
//! depth and size, biased towards the field names and values the decoders look at),
//! and real events (AWS-shaped and moto-shaped S3 records, a Lambda SQS record) with
//! fields dropped or replaced. Beyond "no panic", each accepted result is checked for
//! the invariants the handlers rely on. And the key decoder inverts S3's form
//! encoding for every string.

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Map, Value};
use shared::adapters::memory::{MemoryGateway, MemoryQueue, MemoryWindowStore};
use shared::aggregator::Aggregator;
use shared::clock::SystemClock;
use shared::refresh_message::decode_sqs_record;
use shared::refresher::Refresher;
use shared::s3_event::{decode_key, decode_notification, is_plausible_bucket};
use shared::shares::ShareKind;

/// Cases per property: enough to reach the nested paths, and a few seconds in debug.
const CASES: u32 = 2_000;

fn config() -> Config {
    Config {
        cases: CASES,
        // A failure shrinks to a small case; don't spend minutes on it.
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------

/// Field names the decoders read, so that arbitrary objects reach their nested paths.
const FIELD_NAMES: &[&str] = &[
    "Records",
    "Event",
    "Bucket",
    "eventName",
    "eventTime",
    "eventSource",
    "userIdentity",
    "principalId",
    "s3",
    "bucket",
    "name",
    "object",
    "key",
    "messageId",
    "receiptHandle",
    "body",
    "attributes",
    "messageAttributes",
    "bucket-name",
    "timestamp",
    "stringValue",
    "binaryValue",
    "stringListValues",
    "binaryListValues",
    "dataType",
    "md5OfBody",
    "version",
    "generation",
    "timestampMs",
];

/// Strings that mean something to the decoders.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("s3:TestEvent".to_string()),
        Just("ObjectCreated:Put".to_string()),
        Just("AWS:AROAEXAMPLE:StorageGateway-sgw-12345678".to_string()),
        Just("my-bucket".to_string()),
        Just("String".to_string()),
        Just("Number".to_string()),
        Just("2018-08-12T18:14:02.149Z".to_string()),
        Just("2026-11-27T17:55:01.123456".to_string()),
        Just("-0001-01-01T00:00:00Z".to_string()),
        Just("99999-01-01T00:00:00Z".to_string()),
        Just("a%zzb".to_string()),
        Just("%FF%FE".to_string()),
        Just("dir%2Fsub%2Ffile+name.txt".to_string()),
        Just(r#"{"version":1,"bucket":"my-bucket","generation":1,"windowOpenedAtMs":0,"windowEndsAtMs":0,"timestampMs":0}"#.to_string()),
        Just(r#"{"version":1,"bucket":"my-bucket","generation":18446744073709551615,"windowOpenedAtMs":-9223372036854775808,"windowEndsAtMs":9223372036854775807,"timestampMs":-1}"#.to_string()),
        "[a-z0-9.-]{0,70}",
        "[-+]?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}T[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,9})?(Z|z|[+-][0-9]{2}:[0-9]{2})?",
        "([%+/a-zA-Z0-9]|%[0-9a-fA-F]{0,2}){0,40}",
    ]
}

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => interesting_string(),
        2 => any::<String>(),
        1 => "\\PC{0,8}",
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(FIELD_NAMES).prop_map(str::to_string),
        1 => any_string(),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any_string().prop_map(Value::String),
    ]
}

/// Any JSON value: at most 5 levels deep, about 64 nodes, 8 items per collection.
fn arb_json() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..8)
                .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An S3 record as AWS sends it (the S3 documentation's example).
fn aws_record() -> Value {
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "2018-08-12T18:14:02.149Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {"name": "my-bucket", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": "arn:aws:s3:::my-bucket"},
            "object": {"key": "dir/sub/file+name%3D1.txt", "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e", "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko", "sequencer": "0055AED6DCD90281E5"}
        }
    })
}

/// An S3 record of an expiration by a lifecycle rule (the S3 documentation's
/// `s3:LifecycleExpiration:Delete` example): S3 is the principal, and the object has
/// only its key and sequencer, no size and no eTag.
fn lifecycle_record() -> Value {
    json!({
        "eventVersion": "2.3",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "1970-01-01T00:00:00.000Z",
        "eventName": "LifecycleExpiration:Delete",
        "userIdentity": {"principalId": "s3.amazonaws.com"},
        "requestParameters": {"sourceIPAddress": "s3.amazonaws.com"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {"name": "my-bucket", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": "arn:aws:s3:::my-bucket"},
            "object": {"key": "expiration/delete", "sequencer": "0055AED6DCD90281E5"}
        }
    })
}

/// An S3 record as moto 5 sends it: no userIdentity, no zone on eventTime, '/' as %2F.
fn moto_record() -> Value {
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-27T17:55:01.123456",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "s3-event-aggregator",
            "bucket": {"name": "bkt-1", "arn": "arn:aws:s3:::bkt-1"},
            "object": {"key": "dir%2Fsub%2Ffile+name.txt", "size": 5, "eTag": "5d41402abc4b2a76b9719d911017c592", "versionId": ""}
        }
    })
}

/// A record of a Lambda SQS event carrying our refresh message.
fn sqs_record() -> Value {
    let body = json!({"version": 1, "bucket": "my-bucket", "generation": 3,
        "windowOpenedAtMs": 1_534_097_642_149_i64, "windowEndsAtMs": 1_534_097_672_149_i64,
        "timestampMs": 1_534_097_642_149_i64});
    json!({
        "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
        "body": body.to_string(),
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1545082649183",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1545082649185"
        },
        "messageAttributes": {
            "bucket-name": {"stringValue": "my-bucket", "stringListValues": [], "binaryListValues": [], "dataType": "String"},
            "timestamp": {"stringValue": "1534097642149", "stringListValues": [], "binaryListValues": [], "dataType": "Number"}
        },
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:S3EventAggregatorActionQueue",
        "awsRegion": "us-east-1"
    })
}

/// One step in a path into a JSON value.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
}

/// Every path in `value` (the root excluded), parents before children.
fn paths(value: &Value) -> Vec<Vec<Step>> {
    fn walk(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        let children: Vec<(Step, &Value)> = match value {
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| (Step::Field(k.clone()), v))
                .collect(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (Step::Index(i), v))
                .collect(),
            _ => Vec::new(),
        };
        for (step, child) in children {
            prefix.push(step);
            out.push(prefix.clone());
            walk(child, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

fn parent_mut<'a>(root: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, step| match step {
        Step::Field(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Remove the field (or the array item).
    Drop,
    /// Replace the value with any JSON.
    Replace(Value),
    /// Replace the value with a string (keys, times, bucket names...).
    ReplaceWithString(String),
    /// Add a field next to it.
    AddSibling(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::Drop),
        3 => arb_json().prop_map(Mutation::Replace),
        3 => any_string().prop_map(Mutation::ReplaceWithString),
        1 => (field_name(), arb_json()).prop_map(|(k, v)| Mutation::AddSibling(k, v)),
    ]
}

/// Applies `mutation` at the path chosen by `selector` (an index into the value's
/// paths, taken modulo their number). Paths are recomputed for each mutation, so
/// earlier mutations never leave a dangling one.
fn mutate(value: &mut Value, selector: usize, mutation: &Mutation) {
    let all = paths(value);
    if all.is_empty() {
        *value = match mutation {
            Mutation::Replace(v) => v.clone(),
            Mutation::ReplaceWithString(s) => Value::String(s.clone()),
            _ => Value::Null,
        };
        return;
    }
    let path = &all[selector % all.len()];
    let (last, parent_path) = path.split_last().expect("paths are never empty");
    let Some(parent) = parent_mut(value, parent_path) else {
        return;
    };
    match (parent, last, mutation) {
        (Value::Object(map), Step::Field(k), Mutation::Drop) => {
            map.remove(k);
        }
        (Value::Array(items), Step::Index(i), Mutation::Drop) => {
            items.remove(*i);
        }
        (Value::Object(map), _, Mutation::AddSibling(k, v)) => {
            map.insert(k.clone(), v.clone());
        }
        (Value::Array(items), _, Mutation::AddSibling(_, v)) => items.push(v.clone()),
        (parent, step, Mutation::Replace(_) | Mutation::ReplaceWithString(_)) => {
            let new = match mutation {
                Mutation::Replace(v) => v.clone(),
                Mutation::ReplaceWithString(s) => Value::String(s.clone()),
                _ => unreachable!(),
            };
            let slot = match step {
                Step::Field(k) => parent.get_mut(k.as_str()),
                Step::Index(i) => parent.get_mut(*i),
            };
            if let Some(slot) = slot {
                *slot = new;
            }
        }
        _ => {}
    }
}

/// A real record with 1 to 6 mutations.
fn mutated(template: fn() -> Value) -> impl Strategy<Value = Value> {
    prop::collection::vec((any::<usize>(), mutation()), 1..6).prop_map(move |mutations| {
        let mut value = template();
        for (selector, m) in &mutations {
            mutate(&mut value, *selector, m);
        }
        value
    })
}

/// Targeted replacements of the fields that carry free text: the key, the time, the
/// bucket name, the event name and the principal.
fn s3_record_with_fields(template: fn() -> Value) -> impl Strategy<Value = Value> {
    (
        any_string(),
        any_string(),
        any_string(),
        any_string(),
        any_string(),
    )
        .prop_map(move |(key, time, bucket, event_name, principal)| {
            let mut record = template();
            record["s3"]["object"]["key"] = Value::String(key);
            record["eventTime"] = Value::String(time);
            record["s3"]["bucket"]["name"] = Value::String(bucket);
            record["eventName"] = Value::String(event_name);
            record["userIdentity"] = json!({ "principalId": principal });
            record
        })
}

// ---------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------

/// Decodes a notification and checks what the aggregator relies on: each record gives
/// exactly one change or one skip; every change names a plausible bucket; a change
/// without a key has its undecodable key reported under the same index.
fn check_notification(payload: &Value) {
    let Ok(decoded) = decode_notification(payload) else {
        // Only a payload with no usable "Records" array may be rejected outright.
        let records_is_array = payload.get("Records").is_some_and(Value::is_array);
        let test_event = payload.get("Event").and_then(Value::as_str) == Some("s3:TestEvent");
        assert!(
            !records_is_array && !test_event,
            "rejected a payload with a Records array: {payload}"
        );
        return;
    };
    if payload.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        assert!(decoded.changes.is_empty());
        return;
    }
    let records = payload["Records"]
        .as_array()
        .expect("accepted without a Records array");
    assert_eq!(
        decoded.changes.len() + decoded.skipped.len(),
        records.len(),
        "each record gives one change or one skip: {payload}"
    );
    for change in &decoded.changes {
        assert!(is_plausible_bucket(&change.bucket), "{change:?}");
        if change.key.is_none() {
            assert!(!decoded.undecodable_keys.is_empty(), "{change:?}");
        }
    }
    assert_eq!(
        decoded.undecodable_keys.len(),
        decoded.changes.iter().filter(|c| c.key.is_none()).count()
    );
}

/// Decodes an SQS record and checks what the refresher relies on: an accepted record
/// has a message id to report in `batchItemFailures` and a bucket to refresh.
fn check_sqs_record(record: &Value) {
    if let Ok(request) = decode_sqs_record(record) {
        assert!(!request.message_id.is_empty(), "{record}");
        assert!(!request.bucket.is_empty(), "{record}");
    }
}

// ---------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn notification_decoder_survives_arbitrary_json(value in arb_json()) {
        check_notification(&value);
        check_notification(&json!({ "Records": [value.clone()] }));
        check_notification(&json!({ "Records": value }));
    }

    #[test]
    fn notification_decoder_survives_mutated_aws_records(
        records in prop::collection::vec(mutated(aws_record), 1..4),
    ) {
        check_notification(&json!({ "Records": records }));
    }

    #[test]
    fn notification_decoder_survives_mutated_moto_records(
        records in prop::collection::vec(mutated(moto_record), 1..4),
    ) {
        check_notification(&json!({ "Records": records }));
    }

    #[test]
    fn notification_decoder_survives_mutated_lifecycle_records(
        records in prop::collection::vec(mutated(lifecycle_record), 1..4),
    ) {
        check_notification(&json!({ "Records": records }));
    }

    #[test]
    fn notification_decoder_survives_mutated_notifications(
        payload in mutated(|| json!({ "Records": [aws_record(), moto_record()] })),
    ) {
        check_notification(&payload);
    }

    #[test]
    fn notification_decoder_survives_any_key_time_and_bucket(
        aws in s3_record_with_fields(aws_record),
        moto in s3_record_with_fields(moto_record),
    ) {
        check_notification(&json!({ "Records": [aws, moto] }));
    }

    #[test]
    fn sqs_decoder_survives_arbitrary_json(value in arb_json()) {
        check_sqs_record(&value);
        // The same value in the places the decoder reads.
        let mut record = sqs_record();
        record["body"] = Value::String(value.to_string());
        check_sqs_record(&record);
        record["messageAttributes"] = json!({ "bucket-name": value.clone() });
        check_sqs_record(&record);
        record["messageAttributes"] = value;
        check_sqs_record(&record);
    }

    #[test]
    fn sqs_decoder_survives_mutated_records(record in mutated(sqs_record)) {
        check_sqs_record(&record);
    }

    #[test]
    fn sqs_decoder_survives_any_body_and_bucket(body in any_string(), bucket in any_string(), ts in any_string()) {
        let mut record = sqs_record();
        record["body"] = Value::String(body.clone());
        check_sqs_record(&record);
        record["messageAttributes"]["bucket-name"]["stringValue"] = Value::String(bucket);
        record["messageAttributes"]["timestamp"]["stringValue"] = Value::String(ts);
        check_sqs_record(&record);
        record.as_object_mut().expect("an object").remove("messageAttributes");
        check_sqs_record(&record);
    }

    /// S3 form-encodes keys (space as '+', everything but unreserved characters as
    /// %XX; '/' kept by AWS and encoded by moto); decoding gives the key back.
    #[test]
    fn decode_key_inverts_form_encoding(key in any::<String>(), encode_slash in any::<bool>(), lower_hex in any::<bool>()) {
        let encoded = form_encode(&key, encode_slash, lower_hex);
        prop_assert_eq!(decode_key(&encoded), Ok(key));
    }

    /// The same for keys made of the characters that need care.
    #[test]
    fn decode_key_inverts_form_encoding_of_tricky_keys(key in "[ +%/=&?#a-z\u{e9}\u{1F600}]{0,30}", encode_slash in any::<bool>()) {
        let encoded = form_encode(&key, encode_slash, false);
        prop_assert_eq!(decode_key(&encoded), Ok(key));
    }
}

/// Fewer cases for the handlers: each builds its services and a runtime.
const HANDLER_CASES: u32 = 500;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(future)
}

fn aggregator() -> Aggregator<MemoryWindowStore, MemoryQueue, SystemClock> {
    Aggregator::new(
        MemoryWindowStore::default(),
        MemoryQueue::default(),
        SystemClock,
        30,
    )
}

/// A refresher whose gateway has a share for the templates' bucket, so that decoded
/// messages go all the way to `RefreshCache`.
fn refresher() -> Refresher<MemoryWindowStore, MemoryGateway, MemoryQueue, SystemClock> {
    let gateway = MemoryGateway::new(100);
    gateway.add_share("share-1", ShareKind::Nfs, "arn:aws:s3:::my-bucket");
    gateway.add_share("share-2", ShareKind::Smb, "arn:aws:s3:::my-bucket/dir/");
    Refresher::new(
        MemoryWindowStore::default(),
        gateway,
        MemoryQueue::default(),
        SystemClock,
    )
}

// The whole handlers (decoding, then the window rules and the share matching) over the
// in-memory adapters: whatever the decoders accept, the rest must not panic on either.
proptest! {
    #![proptest_config(Config { cases: HANDLER_CASES, ..config() })]

    #[test]
    fn aggregator_handler_never_panics(payload in prop_oneof![
        arb_json(),
        prop::collection::vec(mutated(aws_record), 1..4).prop_map(|r| json!({ "Records": r })),
        prop::collection::vec(mutated(moto_record), 1..4).prop_map(|r| json!({ "Records": r })),
        (s3_record_with_fields(aws_record), s3_record_with_fields(moto_record))
            .prop_map(|(a, m)| json!({ "Records": [a, m] })),
    ]) {
        let aggregator = aggregator();
        let _ = block_on(aggregator.handle(&payload));
    }

    #[test]
    fn refresher_handler_never_panics(
        records in prop::collection::vec(prop_oneof![3 => mutated(sqs_record), 1 => arb_json()], 1..4),
    ) {
        let refresher = refresher();
        let response = block_on(refresher.handle(&json!({ "Records": records })));
        prop_assert!(response.is_ok());
    }
}

/// The `timestamp` attribute only feeds the log's event age and a metric, so any i64
/// must do; one near `i64::MIN` used to overflow `now - t` in `Refresher::process`.
#[test]
fn refresher_handles_a_timestamp_near_i64_min() {
    let mut record = sqs_record();
    record["messageAttributes"]["timestamp"]["stringValue"] = json!(i64::MIN.to_string());
    let refresher = refresher();
    let response = block_on(refresher.handle(&json!({ "Records": [record] })));
    assert!(response
        .expect("a batch response")
        .batch_item_failures
        .is_empty());
}

/// Form-URL-encoding: space as '+', unreserved characters (and '/', unless
/// `encode_slash`) as themselves, every other byte of the UTF-8 as %XX.
fn form_encode(key: &str, encode_slash: bool, lower_hex: bool) -> String {
    let mut out = String::with_capacity(key.len() * 3);
    for byte in key.bytes() {
        match byte {
            b' ' => out.push('+'),
            b'/' if !encode_slash => out.push('/'),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') => {
                out.push(char::from(b))
            }
            b if lower_hex => out.push_str(&format!("%{b:02x}")),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[test]
fn form_encode_matches_the_shapes_s3_and_moto_send() {
    assert_eq!(
        form_encode("dir/file name+x=.txt", false, false),
        "dir/file+name%2Bx%3D.txt"
    );
    assert_eq!(form_encode("dir/sub", true, false), "dir%2Fsub");
    assert_eq!(form_encode("\u{e9}", false, true), "%c3%a9");
}

#[test]
fn the_templates_decode_before_mutation() {
    let decoded =
        decode_notification(&json!({ "Records": [aws_record(), moto_record()] })).unwrap();
    assert_eq!(decoded.changes.len(), 2);
    assert_eq!(
        decoded.changes[0].key.as_deref(),
        Some("dir/sub/file name=1.txt")
    );
    assert_eq!(
        decoded.changes[1].key.as_deref(),
        Some("dir/sub/file name.txt")
    );
    let request = decode_sqs_record(&sqs_record()).unwrap();
    assert_eq!(
        (request.bucket.as_str(), request.generation),
        ("my-bucket", Some(3))
    );
}

/// Both lifecycle expiration records, of the real shape, are changes of the expired
/// key, with their event time, and nothing is skipped.
#[test]
fn lifecycle_expiration_records_decode_as_changes() {
    let mut marker = lifecycle_record();
    marker["eventName"] = json!("LifecycleExpiration:DeleteMarkerCreated");
    marker["s3"]["object"]["key"] = json!("logs/2024/old+log%281%29.gz");
    assert!(marker["s3"]["object"].get("size").is_none());
    assert!(marker["s3"]["object"].get("eTag").is_none());
    let decoded = decode_notification(&json!({ "Records": [lifecycle_record(), marker] })).unwrap();
    assert!(decoded.skipped.is_empty(), "{:?}", decoded.skipped);
    assert!(decoded.undecodable_keys.is_empty());
    let changes: Vec<_> = decoded
        .changes
        .iter()
        .map(|c| {
            (
                c.bucket.as_str(),
                c.key.as_deref(),
                c.event_name.as_str(),
                c.event_time_ms,
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (
                "my-bucket",
                Some("expiration/delete"),
                "LifecycleExpiration:Delete",
                Some(0)
            ),
            (
                "my-bucket",
                Some("logs/2024/old log(1).gz"),
                "LifecycleExpiration:DeleteMarkerCreated",
                Some(0)
            ),
        ]
    );
    // S3 itself expired the objects: no gateway wrote them.
    assert!(decoded.changes.iter().all(|c| c.writer.is_none()));
}

/// The strategies are not degenerate: together they reach every outcome of both
/// decoders, so "no panic" above covers every branch that produces one.
#[test]
fn the_strategies_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use shared::refresh_message::BadMessage;
    use shared::s3_event::SkipReason;
    use std::collections::BTreeMap;

    let mut runner = TestRunner::deterministic();
    let mut sample = |strategy: &dyn Fn() -> BoxedStrategy<Value>| -> Vec<Value> {
        (0..CASES)
            .map(|_| strategy().new_tree(&mut runner).expect("a value").current())
            .collect()
    };
    let mut notifications = Vec::new();
    notifications.extend(sample(&|| {
        prop::collection::vec(mutated(aws_record), 1..4)
            .prop_map(|r| json!({ "Records": r }))
            .boxed()
    }));
    notifications.extend(sample(&|| {
        prop::collection::vec(mutated(moto_record), 1..4)
            .prop_map(|r| json!({ "Records": r }))
            .boxed()
    }));
    notifications.extend(sample(&|| {
        (
            s3_record_with_fields(aws_record),
            s3_record_with_fields(moto_record),
        )
            .prop_map(|(a, m)| json!({ "Records": [a, m] }))
            .boxed()
    }));
    notifications.extend(sample(&|| arb_json().boxed()));

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for payload in &notifications {
        match decode_notification(payload) {
            Err(_) => *seen.entry("rejected").or_default() += 1,
            Ok(decoded) => {
                for change in &decoded.changes {
                    let outcome = if change.key.is_some() {
                        "change"
                    } else {
                        "change with an undecodable key"
                    };
                    *seen.entry(outcome).or_default() += 1;
                    if change.event_time_ms.is_some() {
                        *seen.entry("change with a time").or_default() += 1;
                    }
                    if change.writer.is_some() {
                        *seen.entry("gateway write").or_default() += 1;
                    }
                }
                for skipped in &decoded.skipped {
                    let outcome = match skipped.reason {
                        SkipReason::TestEvent => "test event",
                        SkipReason::Malformed { .. } => "malformed",
                    };
                    *seen.entry(outcome).or_default() += 1;
                }
            }
        }
    }

    let mut records = sample(&|| mutated(sqs_record).boxed());
    records.extend(sample(&|| arb_json().boxed()));
    for record in &records {
        let outcome = match decode_sqs_record(record) {
            Ok(r) if r.generation.is_some() => "message for a window",
            Ok(r) if r.unreadable_body.is_some() => "whole bucket, body not ours",
            Ok(_) => "whole bucket",
            Err(BadMessage::NoBucket { .. }) => "no bucket",
            Err(BadMessage::NotAMessage(_)) => "not a message",
        };
        *seen.entry(outcome).or_default() += 1;
    }

    for outcome in [
        "rejected",
        "change",
        "change with an undecodable key",
        "change with a time",
        "gateway write",
        "test event",
        "malformed",
        "message for a window",
        "whole bucket, body not ours",
        "whole bucket",
        "no bucket",
        "not a message",
    ] {
        assert!(
            seen.get(outcome).copied().unwrap_or(0) >= 5,
            "the strategies rarely reach {outcome:?}: {seen:?}"
        );
    }
}
