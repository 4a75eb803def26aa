//! `decode_invocation` against realistic payloads of every shape, and property tests.
//!
//! The samples follow the examples in the AWS documentation: the S3 *Event message
//! structure* record, the Lambda SQS and SNS event examples, an SNS envelope as SQS
//! receives it without raw message delivery, and the S3 *EventBridge event message
//! structure* examples. The properties: no input panics (arbitrary JSON, and real
//! envelopes with fields dropped or replaced at every nesting level); whatever is
//! accepted keeps the invariants the aggregator relies on; and in a valid SQS batch
//! every change is attributed to exactly the message whose body produced it.

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Map, Value};
use shared::ingest::{
    decode_invocation, IgnoredEvent, Invocation, InvocationKind, UnitError, UnitEvents,
};
use shared::s3_event::{is_plausible_bucket, ObjectChange, SkipReason, SkippedRecord};
use shared::window::Writer;
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------

/// An S3 record as in the S3 User Guide's *Event message structure*.
fn s3_record(bucket: &str, key: &str, event_name: &str, principal: &str) -> Value {
    json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "2018-08-12T18:14:02.149Z",
        "eventName": event_name,
        "userIdentity": {"principalId": principal},
        "requestParameters": {"sourceIPAddress": "205.255.255.255"},
        "responseElements": {
            "x-amz-request-id": "D82B88E5F771F645",
            "x-amz-id-2": "vlR7PnpV2Ce81l0PRw6jlUpck7Jo5ZsQjryTjKlc5aLWGVHPZLj5NeC6qMa0emYBDXOo6QBU0Wo="
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "828aa6fc-f7b5-4305-8584-487c791949c1",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3I5XTEXAMAI3E"},
                "arn": format!("arn:aws:s3:::{bucket}")
            },
            "object": {
                "key": key,
                "size": 1305107,
                "eTag": "b21b84d653bb07b05b1e6b33684dc11b",
                "sequencer": "0C0F6F405D6ED209E1"
            }
        }
    })
}

/// An S3 record of an expiration by a lifecycle rule, as in the S3 User Guide's
/// *Configuring S3 Lifecycle event notifications* example: S3 itself is the principal
/// and the source address, and the object has only its key and sequencer (no size, no
/// eTag). `event_name` is `LifecycleExpiration:Delete` or
/// `LifecycleExpiration:DeleteMarkerCreated`.
fn lifecycle_record(bucket: &str, key: &str, event_name: &str) -> Value {
    json!({
        "eventVersion": "2.3",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "2018-08-12T18:14:02.149Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "s3.amazonaws.com"},
        "requestParameters": {"sourceIPAddress": "s3.amazonaws.com"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": format!("arn:aws:s3:::{bucket}")
            },
            "object": {"key": key, "sequencer": "0055AED6DCD90281E5"}
        }
    })
}

fn s3_notification(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}

/// The `s3:TestEvent` S3 sends when a notification is configured.
fn s3_test_event() -> Value {
    json!({
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2014-10-13T15:57:02.089Z",
        "Bucket": "amzn-s3-demo-bucket",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"
    })
}

/// A record of the Lambda SQS event, as in the Lambda Developer Guide.
fn sqs_record(message_id: &str, body: &str) -> Value {
    json!({
        "messageId": message_id,
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1545082649183",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1545082649185"
        },
        "messageAttributes": {},
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
        "awsRegion": "us-east-2"
    })
}

/// An SNS notification as an SQS subscription without raw delivery receives it.
fn sns_envelope(message: &str) -> Value {
    json!({
        "Type": "Notification",
        "MessageId": "b9a2d2d1-4b0a-5c3e-9d3a-3c1d4b6a8e21",
        "TopicArn": "arn:aws:sns:us-east-2:123456789012:s3-events",
        "Subject": "Amazon S3 Notification",
        "Message": message,
        "Timestamp": "2018-08-12T18:14:02.301Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858fiTDN6bkkOxYDVrY0Ad8L10Hs3zH81mtnPk5uvvolIC1CXGu43obcgFxeL3khZl8IKvO61GWB6jI9b5+gLPoBc1Q=",
        "SigningCertURL": "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
        "UnsubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-2:123456789012:s3-events:c9135db0-26c4-47ec-8998-413945fb5a96"
    })
}

/// The Lambda SNS event, as in the Lambda Developer Guide.
fn sns_event(message: &str) -> Value {
    json!({"Records": [{
        "EventVersion": "1.0",
        "EventSubscriptionArn": "arn:aws:sns:us-east-2:123456789012:s3-events:c9135db0-26c4-47ec-8998-413945fb5a96",
        "EventSource": "aws:sns",
        "Sns": {
            "SignatureVersion": "1",
            "Timestamp": "2018-08-12T18:14:02.301Z",
            "Signature": "tcc6faL2yUC6dgZdmrwh1Y4cGa/ebXEkAi6RibDsvpi+tE/1+82j...65r==",
            "SigningCertUrl": "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-ac565b8b1a6c5d002d285f9598aa1d9b.pem",
            "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
            "Message": message,
            "MessageAttributes": {},
            "Type": "Notification",
            "UnsubscribeUrl": "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe&amp;SubscriptionArn=arn:aws:sns:us-east-2:123456789012:s3-events:c9135db0-26c4-47ec-8998-413945fb5a96",
            "TopicArn": "arn:aws:sns:us-east-2:123456789012:s3-events",
            "Subject": "Amazon S3 Notification"
        }
    }]})
}

/// The S3 User Guide's EventBridge "Object created" example.
fn eb_object_created(bucket: &str, key: &str) -> Value {
    json!({
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                "sequencer": "617f08299329d189"
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject"
        }
    })
}

/// The "Object deleted (using DeleteObject)" example.
fn eb_object_deleted(bucket: &str, key: &str) -> Value {
    json!({
        "version": "0",
        "id": "2ee9cc15-d022-99ea-1fb8-1b1bac4850f9",
        "detail-type": "Object Deleted",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "etag": "d41d8cd98f00b204e9800998ecf8427e",
                "version-id": "1QW9g1Z99LUNbvaaYVpW9xDlOLU.qxgF",
                "sequencer": "617f0837b476e463"
            },
            "request-id": "0BH729840619AG5K",
            "requester": "123456789012",
            "source-ip-address": "1.2.3.4",
            "reason": "DeleteObject",
            "deletion-type": "Delete Marker Created"
        }
    })
}

/// The "Object deleted (using lifecycle expiration)" example: S3 itself is the
/// requester, and there is no source address.
fn eb_lifecycle_expiration(bucket: &str, key: &str) -> Value {
    json!({
        "version": "0",
        "id": "ad1de317-e409-eba2-9552-30113f8d88e3",
        "detail-type": "Object Deleted",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "etag": "d41d8cd98f00b204e9800998ecf8427e",
                "version-id": "mtB0cV.jejK63XkRNceanNMC.qXPWLeK",
                "sequencer": "617b398000000000"
            },
            "request-id": "20EB74C14654DC47",
            "requester": "s3.amazonaws.com",
            "reason": "Lifecycle Expiration",
            "deletion-type": "Delete Marker Created"
        }
    })
}

/// The "Object restore completed" example.
fn eb_restore_completed(bucket: &str, key: &str) -> Value {
    json!({
        "version": "0",
        "id": "6924de0d-13e2-6bbf-c0c1-b903b753565e",
        "detail-type": "Object Restore Completed",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": [format!("arn:aws:s3:::{bucket}")],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "KKsjUC1.6gIjqtvhfg5AdMI0eCePIiT3"
            },
            "request-id": "189F19CB7FB1B6A4",
            "requester": "s3.amazonaws.com",
            "restore-expiry-time": "2021-11-13T00:00:00Z",
            "source-storage-class": "GLACIER"
        }
    })
}

const USER: &str = "AWS:AIDAJDPLRKLG7UEXAMPLE";
const GATEWAY: &str = "AWS:AROAEXAMPLE:StorageGateway-sgw-12345678";
/// 2018-08-12T18:14:02.149Z
const S3_TIME: i64 = 1_534_097_642_149;
/// 2021-11-12T00:00:00Z
const EB_TIME: i64 = 1_636_675_200_000;

fn change(bucket: &str, key: &str, event_name: &str, time: i64) -> ObjectChange {
    ObjectChange {
        bucket: bucket.to_string(),
        key: Some(key.to_string()),
        event_name: event_name.to_string(),
        event_time_ms: Some(time),
        writer: None,
    }
}

/// The gateway that [`GATEWAY`] names.
fn written_by_gateway(change: ObjectChange) -> ObjectChange {
    ObjectChange {
        writer: Some(Writer::Gateway("sgw-12345678".to_string())),
        ..change
    }
}

fn events_of(invocation: &Invocation, unit: usize) -> &UnitEvents {
    invocation.units[unit]
        .events()
        .unwrap_or_else(|| panic!("unit {unit} failed: {:?}", invocation.units[unit]))
}

// ---------------------------------------------------------------------------------
// Realistic payloads, exact results
// ---------------------------------------------------------------------------------

#[test]
fn direct_notification_from_the_s3_guide() {
    let payload = s3_notification(vec![
        s3_record(
            "amzn-s3-demo-bucket",
            "photos/red+flower%281%29.jpg",
            "ObjectCreated:Put",
            USER,
        ),
        s3_record(
            "amzn-s3-demo-bucket",
            "photos/old.jpg",
            "ObjectRemoved:Delete",
            GATEWAY,
        ),
    ]);
    let inv = decode_invocation(&payload).unwrap();
    assert_eq!(inv.kind, InvocationKind::Direct);
    assert_eq!(inv.units.len(), 1);
    let events = events_of(&inv, 0);
    assert_eq!(
        events.notification.changes,
        [
            change(
                "amzn-s3-demo-bucket",
                "photos/red flower(1).jpg",
                "ObjectCreated:Put",
                S3_TIME
            ),
            written_by_gateway(change(
                "amzn-s3-demo-bucket",
                "photos/old.jpg",
                "ObjectRemoved:Delete",
                S3_TIME
            ))
        ]
    );
    assert!(events.notification.skipped.is_empty());
    assert!(events.ignored.is_empty());
}

/// One SQS batch with each body shape: a plain S3 notification, one wrapped in an SNS
/// envelope (S3 → SNS → SQS), an EventBridge event (rule → SQS), the test event, an
/// ignored EventBridge type, and a body that is not an event at all.
#[test]
fn sqs_batch_of_every_body_shape() {
    let direct = s3_notification(vec![
        s3_record(
            "bucket-one",
            "reports/q1+2024.csv",
            "ObjectCreated:CompleteMultipartUpload",
            USER,
        ),
        s3_record("bucket-two", "a%2Fb.txt", "ObjectCreated:Copy", GATEWAY),
    ]);
    let via_sns = sns_envelope(
        &s3_notification(vec![s3_record(
            "bucket-two",
            "x/y%3Az.bin",
            "ObjectRemoved:DeleteMarkerCreated",
            USER,
        )])
        .to_string(),
    );
    let batch = json!({"Records": [
        sqs_record("059f36b4-87a3-44ab-83d2-661975830a7d", &direct.to_string()),
        sqs_record("2e1424d4-f796-459a-8184-9c92662be6da", &via_sns.to_string()),
        sqs_record("6a8c1d0e-0f25-4d8a-9a8e-1c2f3b4d5e6f", &eb_object_created("bucket-one", "logs/2024-05-01T10:00:00.123.zip").to_string()),
        sqs_record("7b9d2e1f-1a36-4e9b-8b9f-2d3a4c5e6f70", &s3_test_event().to_string()),
        sqs_record("8cae3f20-2b47-4fac-9ca0-3e4b5d6f7081", &eb_restore_completed("bucket-one", "archive/a.tar").to_string()),
        sqs_record("9dbf4031-3c58-40bd-8db1-4f5c6e708192", "Test message."),
    ]});
    let inv = decode_invocation(&batch).unwrap();
    assert_eq!(inv.kind, InvocationKind::Sqs);
    assert_eq!(inv.units.len(), 6);
    for (i, unit) in inv.units.iter().enumerate() {
        assert_eq!(unit.index, i);
        assert_eq!(
            unit.message_id.as_deref(),
            batch["Records"][i]["messageId"].as_str()
        );
    }

    let first = events_of(&inv, 0);
    assert_eq!(
        first.notification.changes,
        [
            change(
                "bucket-one",
                "reports/q1 2024.csv",
                "ObjectCreated:CompleteMultipartUpload",
                S3_TIME
            ),
            written_by_gateway(change(
                "bucket-two",
                "a/b.txt",
                "ObjectCreated:Copy",
                S3_TIME
            ))
        ]
    );
    assert!(first.notification.skipped.is_empty());
    assert_eq!(
        inv.units[1].changes(),
        [change(
            "bucket-two",
            "x/y:z.bin",
            "ObjectRemoved:DeleteMarkerCreated",
            S3_TIME
        )]
    );
    // EventBridge keys are literal: ':' arrives as ':' and stays so.
    assert_eq!(
        inv.units[2].changes(),
        [change(
            "bucket-one",
            "logs/2024-05-01T10:00:00.123.zip",
            "Object Created",
            EB_TIME
        )]
    );
    assert_eq!(
        events_of(&inv, 3).notification.skipped,
        [SkippedRecord {
            index: 0,
            reason: SkipReason::TestEvent,
            bucket: Some("amzn-s3-demo-bucket".to_string())
        }]
    );
    assert_eq!(
        events_of(&inv, 4).ignored,
        [IgnoredEvent {
            index: 0,
            bucket: Some("bucket-one".to_string()),
            detail_type: "Object Restore Completed".to_string()
        }]
    );
    let error = inv.units[5].error().unwrap();
    assert!(
        matches!(
            error,
            UnitError::NotJson {
                what: "SQS body",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.is_permanent());

    assert_eq!(
        inv.sqs_message_ids_for_bucket("bucket-one"),
        [
            "059f36b4-87a3-44ab-83d2-661975830a7d",
            "6a8c1d0e-0f25-4d8a-9a8e-1c2f3b4d5e6f"
        ]
    );
    // The gateway's write in the first message is a change of bucket-two too: other
    // gateways' shares need it, so that message is redelivered if bucket-two fails.
    assert_eq!(
        inv.sqs_message_ids_for_bucket("bucket-two"),
        [
            "059f36b4-87a3-44ab-83d2-661975830a7d",
            "2e1424d4-f796-459a-8184-9c92662be6da"
        ]
    );
    let groups = inv.changes_by_bucket();
    assert_eq!(groups["bucket-one"].units, [0, 2]);
    assert_eq!(groups["bucket-two"].units, [0, 1]);
}

/// moto's S3 → SQS notifications: no userIdentity, eventTime without a zone, '/' as %2F.
#[test]
fn sqs_body_from_moto() {
    let body = json!({"Records": [{
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
    }]});
    let inv =
        decode_invocation(&json!({"Records": [sqs_record("m-1", &body.to_string())]})).unwrap();
    assert_eq!(
        inv.units[0].changes(),
        [change(
            "bkt-1",
            "dir/sub/file name.txt",
            "ObjectCreated:Put",
            1_795_802_101_123
        )]
    );
}

#[test]
fn sns_event_from_the_lambda_guide() {
    let message = s3_notification(vec![s3_record(
        "amzn-s3-demo-bucket",
        "inbox/new+mail.eml",
        "ObjectCreated:Post",
        USER,
    )]);
    let inv = decode_invocation(&sns_event(&message.to_string())).unwrap();
    assert_eq!(inv.kind, InvocationKind::Sns);
    assert_eq!(inv.units.len(), 1);
    assert_eq!(inv.units[0].message_id, None);
    assert_eq!(
        inv.units[0].changes(),
        [change(
            "amzn-s3-demo-bucket",
            "inbox/new mail.eml",
            "ObjectCreated:Post",
            S3_TIME
        )]
    );
    assert!(inv
        .sqs_message_ids_for_bucket("amzn-s3-demo-bucket")
        .is_empty());

    // S3's test event and a non-JSON message.
    let inv = decode_invocation(&sns_event(&s3_test_event().to_string())).unwrap();
    assert_eq!(
        events_of(&inv, 0).notification.skipped[0].reason,
        SkipReason::TestEvent
    );
    let inv = decode_invocation(&sns_event("Hello from SNS!")).unwrap();
    assert!(matches!(
        inv.units[0].error(),
        Some(UnitError::NotJson {
            what: "SNS Message",
            ..
        })
    ));
}

#[test]
fn eventbridge_examples_from_the_s3_guide() {
    let bucket = "amzn-s3-demo-bucket1";
    let cases = [
        (eb_object_created(bucket, "example-key"), "Object Created"),
        (eb_object_deleted(bucket, "example-key"), "Object Deleted"),
        (
            eb_lifecycle_expiration(bucket, "example-key"),
            "Object Deleted",
        ),
    ];
    for (event, detail_type) in cases {
        let inv = decode_invocation(&event).unwrap();
        assert_eq!(inv.kind, InvocationKind::EventBridge);
        assert_eq!(inv.units.len(), 1);
        let events = events_of(&inv, 0);
        assert_eq!(
            events.notification.changes,
            [change(bucket, "example-key", detail_type, EB_TIME)]
        );
        assert!(events.notification.skipped.is_empty());
        assert!(events.ignored.is_empty());
    }
    let inv = decode_invocation(&eb_restore_completed(bucket, "example-key")).unwrap();
    let events = events_of(&inv, 0);
    assert!(events.notification.changes.is_empty());
    assert_eq!(
        events.ignored,
        [IgnoredEvent {
            index: 0,
            bucket: Some(bucket.to_string()),
            detail_type: "Object Restore Completed".to_string()
        }]
    );
    assert_eq!(
        events.ignored[0].to_string(),
        "EventBridge \"Object Restore Completed\" event does not change a listing"
    );
}

const LIFECYCLE_EXPIRATIONS: [&str; 2] = [
    "LifecycleExpiration:Delete",
    "LifecycleExpiration:DeleteMarkerCreated",
];

/// A change's fields, without comparing fields that only some decoders fill in.
fn fields(change: &ObjectChange) -> (&str, Option<&str>, &str, Option<i64>) {
    (
        change.bucket.as_str(),
        change.key.as_deref(),
        change.event_name.as_str(),
        change.event_time_ms,
    )
}

/// Objects that a lifecycle rule expires leave the listing: their records, of the
/// real shape (principal `s3.amazonaws.com`, no size, no eTag), are changes in direct,
/// SQS, SNS → SQS and SNS → Lambda delivery, and are not skipped as anything else.
#[test]
fn lifecycle_expirations_are_changes_in_every_s3_delivery() {
    let bucket = "amzn-s3-demo-bucket";
    for event_name in LIFECYCLE_EXPIRATIONS {
        let notification = s3_notification(vec![lifecycle_record(
            bucket,
            "expired/old+report%281%29.csv",
            event_name,
        )]);
        let text = notification.to_string();
        let deliveries = [
            (InvocationKind::Direct, notification.clone()),
            (
                InvocationKind::Sqs,
                json!({"Records": [sqs_record("m-direct", &text)]}),
            ),
            (
                InvocationKind::Sqs,
                json!({"Records": [sqs_record("m-sns", &sns_envelope(&text).to_string())]}),
            ),
            (InvocationKind::Sns, sns_event(&text)),
        ];
        for (kind, payload) in deliveries {
            let inv = decode_invocation(&payload).unwrap();
            assert_eq!(inv.kind, kind, "{event_name}");
            assert_eq!(inv.units.len(), 1, "{event_name} {kind:?}");
            let events = events_of(&inv, 0);
            let changes: Vec<_> = events.notification.changes.iter().map(fields).collect();
            assert_eq!(
                changes,
                [(
                    bucket,
                    Some("expired/old report(1).csv"),
                    event_name,
                    Some(S3_TIME)
                )],
                "{event_name} {kind:?}"
            );
            assert!(
                events.notification.skipped.is_empty(),
                "{event_name} {kind:?}: {:?}",
                events.notification.skipped
            );
            assert!(events.notification.undecodable_keys.is_empty());
            assert!(events.ignored.is_empty());
            // S3 itself expired the object: no gateway wrote it.
            assert_eq!(events.notification.changes[0].writer, None);
            assert!(inv.units[0].contributes_to(bucket), "{event_name} {kind:?}");
            if kind == InvocationKind::Sqs {
                assert_eq!(inv.sqs_message_ids_for_bucket(bucket).len(), 1);
            }
        }
    }
}

/// A lifecycle expiration next to ordinary records in one notification: each record
/// gives its own change, in order.
#[test]
fn lifecycle_expirations_among_other_records() {
    let payload = s3_notification(vec![
        s3_record("bkt1", "a/new.txt", "ObjectCreated:Put", USER),
        lifecycle_record("bkt1", "a/old.txt", "LifecycleExpiration:Delete"),
        lifecycle_record(
            "bkt2",
            "b/older.txt",
            "LifecycleExpiration:DeleteMarkerCreated",
        ),
        s3_record("bkt2", "b/gone.txt", "ObjectRemoved:Delete", USER),
    ]);
    let inv = decode_invocation(&payload).unwrap();
    let changes: Vec<_> = inv.units[0].changes().iter().map(fields).collect();
    assert_eq!(
        changes,
        [
            (
                "bkt1",
                Some("a/new.txt"),
                "ObjectCreated:Put",
                Some(S3_TIME)
            ),
            (
                "bkt1",
                Some("a/old.txt"),
                "LifecycleExpiration:Delete",
                Some(S3_TIME)
            ),
            (
                "bkt2",
                Some("b/older.txt"),
                "LifecycleExpiration:DeleteMarkerCreated",
                Some(S3_TIME)
            ),
            (
                "bkt2",
                Some("b/gone.txt"),
                "ObjectRemoved:Delete",
                Some(S3_TIME)
            ),
        ]
    );
    let groups = inv.changes_by_bucket();
    assert_eq!(groups.len(), 2);
}

/// In EventBridge mode a lifecycle expiration is an "Object Deleted" event with reason
/// "Lifecycle Expiration", for either deletion type; it counts as a change, directly
/// and through SQS.
#[test]
fn eventbridge_lifecycle_expirations_are_changes() {
    for deletion_type in ["Permanently Deleted", "Delete Marker Created"] {
        let mut event = eb_lifecycle_expiration("bkt1", "expired/a b.txt");
        event["detail"]["deletion-type"] = json!(deletion_type);
        if deletion_type == "Permanently Deleted" {
            // An unversioned object: no version id.
            event["detail"]["object"]
                .as_object_mut()
                .unwrap()
                .remove("version-id");
        }
        assert_eq!(event["detail"]["reason"], "Lifecycle Expiration");
        let batch = json!({"Records": [sqs_record("m1", &event.to_string())]});
        for payload in [event, batch] {
            let inv = decode_invocation(&payload).unwrap();
            let events = events_of(&inv, 0);
            let changes: Vec<_> = events.notification.changes.iter().map(fields).collect();
            assert_eq!(
                changes,
                [(
                    "bkt1",
                    Some("expired/a b.txt"),
                    "Object Deleted",
                    Some(EB_TIME)
                )],
                "{deletion_type}"
            );
            assert!(events.notification.skipped.is_empty(), "{deletion_type}");
            assert!(events.ignored.is_empty(), "{deletion_type}");
        }
    }
}

/// Keys with '+', '%' and spaces arrive literally in EventBridge events.
#[test]
fn eventbridge_keys_are_literal() {
    for key in ["c++/lib.a", "100%/done", "My Documents/a b.txt", "a%2Fb"] {
        let inv = decode_invocation(&eb_object_created("bkt1", key)).unwrap();
        assert_eq!(inv.units[0].changes()[0].key.as_deref(), Some(key));
    }
}

/// EventBridge → SNS → SQS, and EventBridge → SNS → Lambda.
#[test]
fn eventbridge_inside_sns() {
    let message = eb_object_deleted("bkt1", "d/e").to_string();
    let batch = json!({"Records": [sqs_record("m1", &sns_envelope(&message).to_string())]});
    let expected = [change("bkt1", "d/e", "Object Deleted", EB_TIME)];
    assert_eq!(
        decode_invocation(&batch).unwrap().units[0].changes(),
        expected
    );
    assert_eq!(
        decode_invocation(&sns_event(&message)).unwrap().units[0].changes(),
        expected
    );
}

#[test]
fn a_large_sqs_batch() {
    let records: Vec<Value> = (0..10_000)
        .map(|i| {
            let body = s3_notification(vec![s3_record(
                &format!("bucket-{}", i % 7),
                &format!("k/{i}"),
                "ObjectCreated:Put",
                USER,
            )]);
            sqs_record(&format!("m-{i}"), &body.to_string())
        })
        .collect();
    let inv = decode_invocation(&json!({ "Records": records })).unwrap();
    assert_eq!(inv.units.len(), 10_000);
    let ids = inv.sqs_message_ids_for_bucket("bucket-3");
    let expected: Vec<String> = (0..10_000)
        .filter(|i| i % 7 == 3)
        .map(|i| format!("m-{i}"))
        .collect();
    assert_eq!(ids, expected);
}

// ---------------------------------------------------------------------------------
// Strategies (the same approach as tests/decoders.rs)
// ---------------------------------------------------------------------------------

const CASES: u32 = 1_000;

fn config() -> Config {
    Config {
        cases: CASES,
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

/// Field names the decoders read, so that arbitrary objects reach their paths.
const FIELD_NAMES: &[&str] = &[
    "Records",
    "Event",
    "eventSource",
    "EventSource",
    "eventName",
    "eventTime",
    "userIdentity",
    "principalId",
    "s3",
    "bucket",
    "name",
    "object",
    "key",
    "messageId",
    "body",
    "Sns",
    "Type",
    "TopicArn",
    "Message",
    "detail-type",
    "source",
    "detail",
    "time",
];

fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("aws:sqs".to_string()),
        Just("aws:sns".to_string()),
        Just("aws.s3".to_string()),
        Just("Notification".to_string()),
        Just("Object Created".to_string()),
        Just("Object Tags Added".to_string()),
        Just("s3:TestEvent".to_string()),
        Just("my-bucket".to_string()),
        Just("2021-11-12T00:00:00Z".to_string()),
        Just(r#"{"Records":[]}"#.to_string()),
        Just(r#"{"Type":"Notification","TopicArn":"t","Message":"{\"Records\":[{}]}"}"#.to_string()),
        Just(r#"{"detail-type":"Object Created","source":"aws.s3","detail":{"bucket":{"name":"my-bucket"},"object":{"key":"k"}}}"#.to_string()),
        "[a-z0-9.-]{0,70}",
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

#[derive(Debug, Clone)]
enum Step {
    Field(String),
    Index(usize),
}

/// Every path in `value` (the root excluded).
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

fn slot<'a>(root: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, step| match step {
        Step::Field(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Drop,
    Replace(Value),
    AddSibling(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::Drop),
        3 => arb_json().prop_map(Mutation::Replace),
        3 => any_string().prop_map(|s| Mutation::Replace(Value::String(s))),
        1 => (field_name(), arb_json()).prop_map(|(k, v)| Mutation::AddSibling(k, v)),
    ]
}

/// Applies `mutation` at the path picked by `selector` (modulo the number of paths).
fn mutate(value: &mut Value, selector: usize, mutation: &Mutation) {
    let all = paths(value);
    let Some(path) = all.get(selector % all.len().max(1)) else {
        if let Mutation::Replace(v) = mutation {
            *value = v.clone();
        }
        return;
    };
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let Some(parent) = slot(value, parent_path) else {
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
        (parent, step, Mutation::Replace(new)) => {
            if let Some(slot) = slot(parent, std::slice::from_ref(step)) {
                *slot = new.clone();
            }
        }
        _ => {}
    }
}

/// A value from `template` with 1 to 5 mutations.
fn mutated<F>(template: F) -> impl Strategy<Value = Value>
where
    F: Fn() -> Value + Clone + 'static,
{
    prop::collection::vec((any::<usize>(), mutation()), 1..6).prop_map(move |mutations| {
        let mut value = template();
        for (selector, m) in &mutations {
            mutate(&mut value, *selector, m);
        }
        value
    })
}

fn a_notification() -> Value {
    s3_notification(vec![
        s3_record("my-bucket", "dir/a+b%3D1.txt", "ObjectCreated:Put", USER),
        s3_record("bkt-2", "x%2Fy", "ObjectRemoved:Delete", GATEWAY),
    ])
}

fn an_eventbridge_event() -> Value {
    eb_object_created("my-bucket", "dir/file.txt")
}

/// One of the three things an SQS body or SNS message holds, possibly mutated.
fn inner_event() -> impl Strategy<Value = Value> {
    prop_oneof![
        mutated(a_notification),
        mutated(an_eventbridge_event),
        mutated(s3_test_event),
        arb_json(),
    ]
}

/// An SQS body: an event, or an SNS envelope around one, each level possibly mutated.
fn sqs_body() -> impl Strategy<Value = String> {
    prop_oneof![
        inner_event().prop_map(|v| v.to_string()),
        (
            inner_event(),
            prop::collection::vec((any::<usize>(), mutation()), 0..3)
        )
            .prop_map(|(inner, mutations)| {
                let mut envelope = sns_envelope(&inner.to_string());
                for (selector, m) in &mutations {
                    mutate(&mut envelope, *selector, m);
                }
                envelope.to_string()
            }),
        any_string(),
    ]
}

/// An SQS batch of 1 to 5 records with generated bodies, then 0 to 2 mutations of
/// the outer structure.
fn sqs_batch() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(sqs_body(), 1..6),
        prop::collection::vec((any::<usize>(), mutation()), 0..3),
    )
        .prop_map(|(bodies, mutations)| {
            let records: Vec<Value> = bodies
                .iter()
                .enumerate()
                .map(|(i, body)| sqs_record(&format!("m-{i}"), body))
                .collect();
            let mut batch = json!({ "Records": records });
            for (selector, m) in &mutations {
                mutate(&mut batch, *selector, m);
            }
            batch
        })
}

fn sns_invocation() -> impl Strategy<Value = Value> {
    (
        inner_event(),
        prop::collection::vec((any::<usize>(), mutation()), 0..3),
    )
        .prop_map(|(inner, mutations)| {
            let mut event = sns_event(&inner.to_string());
            for (selector, m) in &mutations {
                mutate(&mut event, *selector, m);
            }
            event
        })
}

// ---------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------

/// Decodes `payload` and checks what the aggregator relies on.
fn check(payload: &Value) {
    let Ok(inv) = decode_invocation(payload) else {
        // Only a payload in none of the shapes may be rejected outright.
        let object = payload.as_object();
        let records_is_array =
            object.is_some_and(|o| o.get("Records").is_some_and(Value::is_array));
        let eventbridge = object.is_some_and(|o| o.contains_key("detail-type"));
        let test_event = payload.get("Event").and_then(Value::as_str) == Some("s3:TestEvent");
        assert!(
            !records_is_array && !eventbridge && !test_event,
            "rejected {payload}"
        );
        return;
    };
    if inv.kind == InvocationKind::Sqs {
        let records = payload["Records"].as_array().expect("SQS without Records");
        assert_eq!(inv.units.len(), records.len());
        for (i, (unit, record)) in inv.units.iter().zip(records).enumerate() {
            assert_eq!(unit.index, i);
            assert_eq!(
                unit.message_id.as_deref(),
                record.get("messageId").and_then(Value::as_str)
            );
        }
    } else {
        assert_eq!(inv.units.len(), 1, "{payload}");
        assert_eq!(inv.units[0].message_id, None);
    }
    let mut total = 0;
    for unit in &inv.units {
        if let Some(events) = unit.events() {
            let n = &events.notification;
            assert_eq!(
                n.undecodable_keys.len(),
                n.changes.iter().filter(|c| c.key.is_none()).count(),
                "{payload}"
            );
        }
        for change in unit.changes() {
            assert!(is_plausible_bucket(&change.bucket), "{change:?}");
        }
        total += unit.changes().len();
    }
    let groups = inv.changes_by_bucket();
    assert_eq!(
        groups.values().map(|g| g.changes.len()).sum::<usize>(),
        total
    );
    for (bucket, group) in &groups {
        let contributors: Vec<usize> = (0..inv.units.len())
            .filter(|&i| inv.units[i].contributes_to(bucket))
            .collect();
        assert_eq!(group.units, contributors);
        let mut expected: Vec<&str> = Vec::new();
        for &i in &contributors {
            if let Some(id) = inv.units[i].message_id.as_deref() {
                if !expected.contains(&id) {
                    expected.push(id);
                }
            }
        }
        assert_eq!(inv.sqs_message_ids_for_bucket(bucket), expected);
    }
}

// ---------------------------------------------------------------------------------
// Attribution model
// ---------------------------------------------------------------------------------

const BUCKETS: [&str; 3] = ["bkt-a", "bkt-b", "bkt-c"];

/// What one valid SQS message carries, and so which changes it must produce.
#[derive(Debug, Clone)]
enum Body {
    /// An S3 notification: (bucket, key, written by the gateway).
    S3(Vec<(usize, String, bool)>),
    /// The same, in an SNS envelope.
    Sns(Vec<(usize, String, bool)>),
    /// EventBridge "Object Created" (true) or "Object Deleted".
    EventBridge(bool, usize, String),
    /// A detail-type that changes no listing.
    Ignored(usize, String),
    TestEvent,
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9/ +:%._-]{1,16}", "\\PC{1,8}",]
}

/// 0 to 3 S3 records: (bucket, key, written by the gateway).
fn records() -> impl Strategy<Value = Vec<(usize, String, bool)>> {
    prop::collection::vec((0..BUCKETS.len(), key(), prop::bool::weighted(0.2)), 0..4)
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => records().prop_map(Body::S3),
        2 => records().prop_map(Body::Sns),
        2 => (any::<bool>(), 0..BUCKETS.len(), key()).prop_map(|(c, b, k)| Body::EventBridge(c, b, k)),
        1 => (0..BUCKETS.len(), key()).prop_map(|(b, k)| Body::Ignored(b, k)),
        1 => Just(Body::TestEvent),
    ]
}

/// S3's form encoding of a key: unreserved bytes and '/' as is, ' ' as '+', the rest
/// as %XX.
fn form_encode(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Body {
    fn to_json(&self) -> String {
        let notification = |records: &[(usize, String, bool)]| {
            s3_notification(
                records
                    .iter()
                    .map(|(b, k, gw)| {
                        s3_record(
                            BUCKETS[*b],
                            &form_encode(k),
                            "ObjectCreated:Put",
                            if *gw { GATEWAY } else { USER },
                        )
                    })
                    .collect(),
            )
        };
        match self {
            Body::S3(records) => notification(records).to_string(),
            Body::Sns(records) => sns_envelope(&notification(records).to_string()).to_string(),
            Body::EventBridge(true, b, k) => eb_object_created(BUCKETS[*b], k).to_string(),
            Body::EventBridge(false, b, k) => eb_object_deleted(BUCKETS[*b], k).to_string(),
            Body::Ignored(b, k) => {
                let mut event = eb_restore_completed(BUCKETS[*b], k);
                event["detail-type"] = json!("Object Tags Added");
                event.to_string()
            }
            Body::TestEvent => s3_test_event().to_string(),
        }
    }

    /// The (bucket, key) of every change this body must produce, in order.
    fn expected(&self) -> Vec<(String, String)> {
        match self {
            // Gateway writes are changes too: every other gateway's shares need them.
            Body::S3(records) | Body::Sns(records) => records
                .iter()
                .map(|(b, k, _)| (BUCKETS[*b].to_string(), k.clone()))
                .collect(),
            Body::EventBridge(_, b, k) => vec![(BUCKETS[*b].to_string(), k.clone())],
            Body::Ignored(..) | Body::TestEvent => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_json_never_panics(value in arb_json()) {
        check(&value);
        check(&json!({ "Records": [value.clone()] }));
        check(&json!({ "Records": value.clone() }));
        check(&json!({ "Records": [sqs_record("m", &value.to_string())] }));
        check(&json!({ "Records": [sqs_record("m", &sns_envelope(&value.to_string()).to_string())] }));
        check(&sns_event(&value.to_string()));
        check(&json!({ "Records": [{ "EventSource": "aws:sns", "Sns": value.clone() }] }));
        check(&json!({ "detail-type": "Object Created", "source": "aws.s3", "detail": value }));
    }

    #[test]
    fn mutated_sqs_batches_never_panic(batch in sqs_batch()) {
        check(&batch);
    }

    #[test]
    fn mutated_sns_invocations_never_panic(event in sns_invocation()) {
        check(&event);
    }

    #[test]
    fn mutated_direct_and_eventbridge_payloads_never_panic(payload in prop_oneof![
        mutated(a_notification),
        mutated(an_eventbridge_event),
        mutated(|| eb_lifecycle_expiration("my-bucket", "k")),
        mutated(s3_test_event),
    ]) {
        check(&payload);
    }

    /// In a valid SQS batch, each message yields exactly the changes of its own body,
    /// and a bucket's failure names exactly the messages that had a change for it.
    #[test]
    fn changes_are_attributed_to_their_message(bodies in prop::collection::vec(body(), 1..10)) {
        let ids: Vec<String> = (0..bodies.len()).map(|i| format!("msg-{i:04}-{}", i * 7919 % 10_007)).collect();
        let records: Vec<Value> = bodies
            .iter()
            .zip(&ids)
            .map(|(body, id)| sqs_record(id, &body.to_json()))
            .collect();
        let batch = json!({ "Records": records });
        let inv = decode_invocation(&batch).unwrap();
        prop_assert_eq!(inv.kind, InvocationKind::Sqs);
        prop_assert_eq!(inv.units.len(), bodies.len());
        let mut expected_by_bucket: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for ((unit, body), id) in inv.units.iter().zip(&bodies).zip(&ids) {
            prop_assert_eq!(unit.message_id.as_deref(), Some(id.as_str()));
            prop_assert!(unit.error().is_none(), "{:?}", unit);
            let got: Vec<(String, String)> = unit
                .changes()
                .iter()
                .map(|c| (c.bucket.clone(), c.key.clone().unwrap_or_default()))
                .collect();
            let expected = body.expected();
            prop_assert_eq!(&got, &expected, "{:?}", body);
            for (bucket, _) in expected {
                let ids = expected_by_bucket.entry(bucket).or_default();
                if ids.last() != Some(&id.as_str()) {
                    ids.push(id);
                }
            }
        }
        for bucket in BUCKETS {
            let expected = expected_by_bucket.get(bucket).cloned().unwrap_or_default();
            prop_assert_eq!(inv.sqs_message_ids_for_bucket(bucket), expected);
        }
        check(&batch);
    }
}
