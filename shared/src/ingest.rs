//! Decoding of every payload shape in which S3 object events reach the aggregator.
//!
//! | [`InvocationKind`] | payload | units |
//! |---|---|---|
//! | `Direct` | S3 → Lambda: `{"Records":[{s3 record}...]}` or an `s3:TestEvent` | one |
//! | `Sqs` | `{"Records":[{"eventSource":"aws:sqs","messageId":..,"body":..}...]}` | one per SQS record |
//! | `Sns` | `{"Records":[{"EventSource":"aws:sns","Sns":{"Message":..}}]}` | one |
//! | `EventBridge` | `{"version":"0","detail-type":..,"source":"aws.s3","detail":{..}}` | one |
//!
//! An SQS body is an S3 notification (or `s3:TestEvent`), an SNS envelope
//! (`{"Type":"Notification","Message":".."}`, S3 → SNS → SQS without raw delivery) or
//! an EventBridge event (rule → SQS target). An SNS `Message` is an S3 notification or
//! an EventBridge event. Nesting stops there: SQS body → SNS envelope → event. The
//! decoders call each other in that order only, so no input can make them recurse.
//!
//! A [`Unit`] is what succeeds or fails together: one SQS record (reported by its
//! `messageId` in `batchItemFailures`), or the whole invocation for the other kinds.
//! Each unit keeps its own [`DecodedNotification`], so every change can be traced back
//! to the SQS message that carried it ([`Invocation::sqs_message_ids_for_bucket`]).
//! Records inside a unit that cannot be used are skipped one by one, exactly as
//! [`decode_notification`] does; a unit whose whole body is unusable gets a
//! [`UnitError`].
//!
//! # EventBridge decisions
//!
//! - **Keys are taken literally, not URL-decoded.** The S3 User Guide says so for
//!   notifications ("The object key name value is URL encoded", *Event message
//!   structure*), but its EventBridge page (*EventBridge event message structure*,
//!   `ev-events`) documents `detail.object.key` with no such note. A real captured
//!   event (gist vincentclaes/7a5eb53acc05b316c86769fed25d4e1a) carries
//!   `"raw/health-check/2023-08-08T14:03:40.532432.zip"` with literal `:`, which a
//!   notification sends as `%3A` (aws/aws-sdk-js#837); moto's S3 → EventBridge
//!   emitter also sends the plain key (`moto/s3/notifications.py`,
//!   `_build_eventbridge_event`), while its notifications are URL-encoded
//!   (getmoto/moto#9060). Powertools for Python does `unquote_plus` on this key; we do
//!   not, because that would turn a literal `+` into a space and refresh the wrong
//!   folder.
//! - **Gateway writes cannot be recognised.** EventBridge events carry no
//!   `userIdentity.principalId`, only `requester` ("AWS account ID or AWS service
//!   principal of requester") and `source-ip-address`. The gateway writes with an IAM
//!   role of the bucket owner's account, so its `requester` is the same account ID as
//!   any other writer's, and its address is not known to us. Such events are therefore
//!   refreshed like any other: a redundant refresh is harmless, a missed one is not.
//! - **Which detail-types count.** `Object Created` and `Object Deleted` (either
//!   `deletion-type`: a delete marker hides the key too) change a listing. The other
//!   documented types ([`NOT_LISTING_CHANGES`]: restores, storage class and access
//!   tier transitions, ACL and tag changes) leave the set of keys as it was and become
//!   an [`IgnoredEvent`]. A detail-type not in either list is treated as a change:
//!   if AWS adds one, an extra refresh costs little and a lost one breaks the invariant.

use crate::json::{kind_of, str_at};
use crate::s3_event::{
    decode_notification, is_plausible_bucket, parse_event_time, DecodedNotification,
    NotANotification, ObjectChange, SkipReason, SkippedRecord,
};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use thiserror::Error;

/// S3 EventBridge detail-types that leave the set of keys in a bucket unchanged
/// (S3 User Guide, *Using EventBridge*).
pub const NOT_LISTING_CHANGES: [&str; 8] = [
    "Object Restore Initiated",
    "Object Restore Completed",
    "Object Restore Expired",
    "Object Storage Class Changed",
    "Object Access Tier Changed",
    "Object ACL Updated",
    "Object Tags Added",
    "Object Tags Deleted",
];

/// How the Lambda function was invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum InvocationKind {
    /// An S3 event notification sent straight to Lambda.
    Direct,
    /// A batch from an SQS event source mapping.
    Sqs,
    /// An SNS subscription.
    Sns,
    /// An EventBridge rule with the function as target.
    EventBridge,
}

/// One decoded Lambda invocation payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub kind: InvocationKind,
    /// For `Sqs`, one unit per record, in batch order; otherwise exactly one.
    pub units: Vec<Unit>,
}

/// The part of a payload that succeeds or fails together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Position of the record in the SQS batch; 0 for the other kinds.
    pub index: usize,
    /// The SQS `messageId`, for `batchItemFailures`. `None` for the other kinds, and
    /// for an SQS record without one (Lambda always sends one): such a unit can only
    /// be retried with the whole batch.
    pub message_id: Option<String>,
    pub outcome: Result<UnitEvents, UnitError>,
}

/// What a unit's events decoded to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnitEvents {
    /// Changes, skipped records and undecodable keys. For an S3 notification the
    /// indexes are record positions; for an EventBridge event they are 0; for a unit
    /// that merges several SNS records they run on across the records.
    pub notification: DecodedNotification,
    /// Well-formed S3 events that change no listing.
    pub ignored: Vec<IgnoredEvent>,
}

/// An S3 event that does not change which keys a bucket holds, so nothing needs a
/// refresh (an EventBridge detail-type in [`NOT_LISTING_CHANGES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredEvent {
    pub index: usize,
    /// The bucket, when the event named a plausible one.
    pub bucket: Option<String>,
    pub detail_type: String,
}

impl fmt::Display for IgnoredEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EventBridge {:?} event does not change a listing",
            self.detail_type
        )
    }
}

/// Why a unit produced nothing at all.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UnitError {
    #[error("SQS record has no string \"body\"")]
    NoBody,
    #[error("{what} is not JSON: {error}")]
    NotJson { what: &'static str, error: String },
    #[error("SNS {message_type:?} message, not a Notification")]
    NotAnSnsNotification { message_type: String },
    #[error("SNS notification has no string \"Message\"")]
    NoSnsMessage,
    #[error("EventBridge event from {}, not aws.s3", source_name(.event_source))]
    NotFromS3 { event_source: Option<String> },
    /// JSON, but none of the shapes an S3 event arrives in.
    #[error("not an S3 event: {0}")]
    NotAnS3Event(String),
}

fn source_name(source: &Option<String>) -> String {
    source
        .as_deref()
        .map_or_else(|| "no source".to_string(), |s| format!("{s:?}"))
}

impl UnitError {
    /// Whether retrying the unit cannot help. Decoding depends on the message alone,
    /// so every decoding error is permanent: the caller logs and drops the unit rather
    /// than have SQS redeliver it until it lands in the dead-letter queue.
    pub fn is_permanent(&self) -> bool {
        // Exhaustive, so that a new variant has to decide.
        match self {
            UnitError::NoBody
            | UnitError::NotJson { .. }
            | UnitError::NotAnSnsNotification { .. }
            | UnitError::NoSnsMessage
            | UnitError::NotFromS3 { .. }
            | UnitError::NotAnS3Event(_) => true,
        }
    }
}

/// The changes of one bucket across all units.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BucketChanges<'a> {
    pub changes: Vec<&'a ObjectChange>,
    /// Indexes into [`Invocation::units`] of the units that contributed, ascending,
    /// each once.
    pub units: Vec<usize>,
}

impl Unit {
    pub fn events(&self) -> Option<&UnitEvents> {
        self.outcome.as_ref().ok()
    }

    pub fn error(&self) -> Option<&UnitError> {
        self.outcome.as_ref().err()
    }

    /// The unit's changes; none if it failed.
    pub fn changes(&self) -> &[ObjectChange] {
        self.events()
            .map_or(&[], |events| events.notification.changes.as_slice())
    }

    /// Whether the unit holds at least one change for `bucket`.
    pub fn contributes_to(&self, bucket: &str) -> bool {
        self.changes().iter().any(|c| c.bucket == bucket)
    }
}

impl Invocation {
    /// Every change, with the index of the unit that produced it.
    pub fn changes(&self) -> impl Iterator<Item = (usize, &ObjectChange)> {
        self.units
            .iter()
            .enumerate()
            .flat_map(|(i, unit)| unit.changes().iter().map(move |c| (i, c)))
    }

    /// The changes grouped by bucket, each group with the units it came from.
    pub fn changes_by_bucket(&self) -> BTreeMap<&str, BucketChanges<'_>> {
        let mut buckets: BTreeMap<&str, BucketChanges<'_>> = BTreeMap::new();
        for (unit, change) in self.changes() {
            let group = buckets.entry(change.bucket.as_str()).or_default();
            group.changes.push(change);
            if group.units.last() != Some(&unit) {
                group.units.push(unit);
            }
        }
        buckets
    }

    /// The units that contributed at least one change to `bucket`, in order.
    pub fn units_for_bucket<'a>(&'a self, bucket: &'a str) -> impl Iterator<Item = &'a Unit> {
        self.units.iter().filter(move |u| u.contributes_to(bucket))
    }

    /// The `messageId`s to report in `batchItemFailures` when `bucket`'s write fails:
    /// every SQS message that contributed a change to it, in batch order, each once.
    /// Empty for the other kinds (their failure fails the invocation). A contributing
    /// record without a `messageId` is not listed; see [`Unit::message_id`].
    pub fn sqs_message_ids_for_bucket(&self, bucket: &str) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.units
            .iter()
            .filter(|u| u.contributes_to(bucket))
            .filter_map(|u| u.message_id.as_deref())
            .filter(|id| seen.insert(*id))
            .collect()
    }

    /// The units that could not be decoded at all.
    pub fn failed_units(&self) -> impl Iterator<Item = (&Unit, &UnitError)> {
        self.units.iter().filter_map(|u| u.error().map(|e| (u, e)))
    }
}

/// Decodes one Lambda invocation payload of any supported shape. Fails only when the
/// payload is none of them; problems inside a unit are reported in that unit.
pub fn decode_invocation(payload: &Value) -> Result<Invocation, NotANotification> {
    let Some(object) = payload.as_object() else {
        return Err(NotANotification(format!(
            "expected a JSON object, got {}",
            kind_of(payload)
        )));
    };
    if let Some(Value::Array(records)) = object.get("Records") {
        if records
            .iter()
            .any(|r| str_field(r, "eventSource") == Some("aws:sqs"))
        {
            return Ok(decode_sqs_batch(records));
        }
        if records
            .iter()
            .any(|r| str_field(r, "EventSource") == Some("aws:sns"))
        {
            return Ok(decode_sns_invocation(records));
        }
    }
    if is_eventbridge(object) {
        return Ok(Invocation {
            kind: InvocationKind::EventBridge,
            units: vec![whole_unit(decode_eventbridge(object))],
        });
    }
    let notification = decode_notification(payload)?;
    Ok(Invocation {
        kind: InvocationKind::Direct,
        units: vec![whole_unit(Ok(UnitEvents::from(notification)))],
    })
}

impl From<DecodedNotification> for UnitEvents {
    fn from(notification: DecodedNotification) -> Self {
        UnitEvents {
            notification,
            ignored: Vec::new(),
        }
    }
}

impl UnitEvents {
    /// One per record or event: each gives a change, a skip or an ignore.
    fn event_count(&self) -> usize {
        self.notification.changes.len() + self.notification.skipped.len() + self.ignored.len()
    }

    /// Appends `other`, shifting its indexes by `offset`.
    fn append(&mut self, other: UnitEvents, offset: usize) {
        let UnitEvents {
            notification,
            ignored,
        } = other;
        let n = &mut self.notification;
        n.changes.extend(notification.changes);
        n.skipped
            .extend(notification.skipped.into_iter().map(|mut s| {
                s.index += offset;
                s
            }));
        n.undecodable_keys
            .extend(notification.undecodable_keys.into_iter().map(|mut u| {
                u.index += offset;
                u
            }));
        self.ignored.extend(ignored.into_iter().map(|mut i| {
            i.index += offset;
            i
        }));
    }
}

fn whole_unit(outcome: Result<UnitEvents, UnitError>) -> Unit {
    Unit {
        index: 0,
        message_id: None,
        outcome,
    }
}

fn decode_sqs_batch(records: &[Value]) -> Invocation {
    let units = records
        .iter()
        .enumerate()
        .map(|(index, record)| Unit {
            index,
            message_id: str_field(record, "messageId").map(str::to_string),
            outcome: match str_field(record, "body") {
                Some(body) => parse_json("SQS body", body).and_then(|v| decode_body(&v)),
                None => Err(UnitError::NoBody),
            },
        })
        .collect();
    Invocation {
        kind: InvocationKind::Sqs,
        units,
    }
}

/// Lambda sends one record per SNS invocation; should there be several, they form one
/// unit. A bad record among good ones is skipped as malformed, so that it cannot take
/// the others' changes down with it; the unit fails only if no record decodes.
fn decode_sns_invocation(records: &[Value]) -> Invocation {
    let mut merged = UnitEvents::default();
    let mut first_error = None;
    let mut any_decoded = false;
    let mut offset = 0;
    for record in records {
        let decoded = match record.get("Sns").and_then(Value::as_object) {
            Some(sns) => sns_message(sns).and_then(|message| decode_event(&message)),
            None => Err(UnitError::NotAnS3Event(
                "SNS record without an \"Sns\" object".to_string(),
            )),
        };
        match decoded {
            Ok(events) => {
                any_decoded = true;
                let count = events.event_count();
                merged.append(events, offset);
                offset += count;
            }
            Err(error) => {
                merged.notification.skipped.push(SkippedRecord {
                    index: offset,
                    reason: SkipReason::Malformed {
                        detail: error.to_string(),
                    },
                    bucket: None,
                });
                offset += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    let outcome = match first_error {
        Some(error) if !any_decoded => Err(error),
        _ => Ok(merged),
    };
    Invocation {
        kind: InvocationKind::Sns,
        units: vec![whole_unit(outcome)],
    }
}

/// An SQS body: an SNS envelope around an event, or the event itself.
fn decode_body(body: &Value) -> Result<UnitEvents, UnitError> {
    match body.as_object() {
        Some(object) if is_sns_envelope(object) => {
            let message = sns_message(object)?;
            decode_event(&message)
        }
        _ => decode_event(body),
    }
}

/// The innermost level: an S3 notification or an EventBridge event, never another
/// envelope.
fn decode_event(value: &Value) -> Result<UnitEvents, UnitError> {
    let Some(object) = value.as_object() else {
        return Err(UnitError::NotAnS3Event(format!(
            "expected a JSON object, got {}",
            kind_of(value)
        )));
    };
    let is_notification = object.contains_key("Records")
        || object.get("Event").and_then(Value::as_str) == Some("s3:TestEvent");
    if !is_notification {
        if is_eventbridge(object) {
            return decode_eventbridge(object);
        }
        if is_sns_envelope(object) {
            return Err(UnitError::NotAnS3Event(
                "SNS envelope inside an SNS envelope".to_string(),
            ));
        }
    }
    decode_notification(value)
        .map(UnitEvents::from)
        .map_err(|e| UnitError::NotAnS3Event(e.0))
}

fn is_eventbridge(object: &Map<String, Value>) -> bool {
    object.contains_key("detail-type")
}

/// SNS envelopes always carry `Type` and `TopicArn`; S3 and EventBridge events never do.
fn is_sns_envelope(object: &Map<String, Value>) -> bool {
    object.contains_key("Type") && object.contains_key("TopicArn")
}

/// The parsed `Message` of an SNS notification.
fn sns_message(sns: &Map<String, Value>) -> Result<Value, UnitError> {
    match sns.get("Type") {
        None => {}
        Some(Value::String(t)) if t == "Notification" => {}
        Some(other) => {
            return Err(UnitError::NotAnSnsNotification {
                message_type: other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_string),
            })
        }
    }
    let message = sns
        .get("Message")
        .and_then(Value::as_str)
        .ok_or(UnitError::NoSnsMessage)?;
    parse_json("SNS Message", message)
}

fn parse_json(what: &'static str, text: &str) -> Result<Value, UnitError> {
    serde_json::from_str(text).map_err(|e| UnitError::NotJson {
        what,
        error: e.to_string(),
    })
}

/// Decodes one EventBridge event from `aws.s3` into a change, a skip or an ignore.
fn decode_eventbridge(event: &Map<String, Value>) -> Result<UnitEvents, UnitError> {
    let source = event.get("source").and_then(Value::as_str);
    if source != Some("aws.s3") {
        return Err(UnitError::NotFromS3 {
            event_source: source.map(str::to_string),
        });
    }
    let mut events = UnitEvents::default();
    let detail = event.get("detail").filter(|d| d.is_object());
    let bucket_name = detail.and_then(|d| str_at(d, &["bucket", "name"]));
    let plausible_bucket = bucket_name
        .filter(|name| is_plausible_bucket(name))
        .map(str::to_string);
    let skip = |events: &mut UnitEvents, detail: String, bucket: Option<String>| {
        events.notification.skipped.push(SkippedRecord {
            index: 0,
            reason: SkipReason::Malformed { detail },
            bucket,
        });
    };
    let Some(detail_type) = event.get("detail-type").and_then(Value::as_str) else {
        skip(&mut events, "no string \"detail-type\"".into(), None);
        return Ok(events);
    };
    if NOT_LISTING_CHANGES.contains(&detail_type) {
        events.ignored.push(IgnoredEvent {
            index: 0,
            bucket: plausible_bucket,
            detail_type: detail_type.to_string(),
        });
        return Ok(events);
    }
    let Some(detail) = detail else {
        skip(&mut events, "no \"detail\" object".into(), None);
        return Ok(events);
    };
    let bucket = match (bucket_name, plausible_bucket) {
        (_, Some(bucket)) => bucket,
        (Some(name), None) => {
            skip(&mut events, format!("invalid bucket name {name:?}"), None);
            return Ok(events);
        }
        (None, None) => {
            skip(&mut events, "no detail.bucket.name".into(), None);
            return Ok(events);
        }
    };
    // Literal, not URL-decoded: see the module documentation.
    let Some(key) = str_at(detail, &["object", "key"]) else {
        skip(&mut events, "no detail.object.key".into(), Some(bucket));
        return Ok(events);
    };
    events.notification.changes.push(ObjectChange {
        bucket,
        key: Some(key.to_string()),
        event_name: detail_type.to_string(),
        event_time_ms: event
            .get("time")
            .and_then(Value::as_str)
            .and_then(parse_event_time),
        // EventBridge names the requester's account, not its principal: no gateway
        // can be told apart, so every share is refreshed.
        writer: None,
    });
    Ok(events)
}

fn str_field<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value.get(field).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3_event::{KeyDecodeError, UndecodableKey};
    use serde_json::json;

    fn s3_record(bucket: &str, key: &str) -> Value {
        json!({
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
                "object": {"key": key, "size": 1, "sequencer": "0055AED6DCD90281E5"}
            }
        })
    }

    fn notification(records: &[(&str, &str)]) -> Value {
        let records: Vec<Value> = records.iter().map(|(b, k)| s3_record(b, k)).collect();
        json!({ "Records": records })
    }

    fn sqs_record(id: &str, body: &str) -> Value {
        json!({
            "messageId": id,
            "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
            "body": body,
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:events",
            "awsRegion": "us-east-1"
        })
    }

    fn sns_envelope(message: &str) -> Value {
        json!({
            "Type": "Notification",
            "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:s3-events",
            "Subject": "Amazon S3 Notification",
            "Message": message,
            "Timestamp": "2021-11-12T00:00:00.000Z"
        })
    }

    fn eventbridge(detail_type: &str, bucket: &str, key: &str) -> Value {
        json!({
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": detail_type,
            "source": "aws.s3",
            "account": "111122223333",
            "time": "2021-11-12T00:00:00Z",
            "region": "ca-central-1",
            "resources": [format!("arn:aws:s3:::{bucket}")],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {"key": key, "size": 5},
                "request-id": "N4N7GDK58NMKJ12R",
                "requester": "111122223333",
                "source-ip-address": "1.2.3.4",
                "reason": "PutObject"
            }
        })
    }

    fn change(bucket: &str, key: &str, event_name: &str, time: Option<i64>) -> ObjectChange {
        ObjectChange {
            bucket: bucket.into(),
            key: Some(key.into()),
            event_name: event_name.into(),
            event_time_ms: time,
            writer: None,
        }
    }

    fn put(bucket: &str, key: &str) -> ObjectChange {
        change(bucket, key, "ObjectCreated:Put", Some(0))
    }

    /// 2021-11-12T00:00:00Z
    const EB_TIME: i64 = 1_636_675_200_000;

    #[test]
    fn direct_notification() {
        let inv = decode_invocation(&notification(&[("bkt1", "a/b+c.txt")])).unwrap();
        assert_eq!(inv.kind, InvocationKind::Direct);
        assert_eq!(inv.units.len(), 1);
        assert_eq!(inv.units[0].message_id, None);
        assert_eq!(inv.units[0].changes(), &[put("bkt1", "a/b c.txt")]);
    }

    #[test]
    fn direct_test_event() {
        let e = json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt1"});
        let inv = decode_invocation(&e).unwrap();
        assert_eq!(inv.kind, InvocationKind::Direct);
        let events = inv.units[0].events().unwrap();
        assert_eq!(events.notification.skipped[0].reason, SkipReason::TestEvent);
        assert!(events.notification.changes.is_empty());
    }

    #[test]
    fn sqs_batch_with_every_body_shape() {
        let s3 = notification(&[("bkt1", "a/1"), ("bkt2", "b/2")]).to_string();
        let via_sns = sns_envelope(&notification(&[("bkt1", "c/3")]).to_string()).to_string();
        let eb = eventbridge("Object Deleted", "bkt2", "d e/4+5").to_string();
        let test = json!({"Service": "Amazon S3", "Event": "s3:TestEvent"}).to_string();
        let batch = json!({"Records": [
            sqs_record("m1", &s3),
            sqs_record("m2", &via_sns),
            sqs_record("m3", &eb),
            sqs_record("m4", &test),
        ]});
        let inv = decode_invocation(&batch).unwrap();
        assert_eq!(inv.kind, InvocationKind::Sqs);
        let ids: Vec<_> = inv.units.iter().map(|u| u.message_id.as_deref()).collect();
        assert_eq!(ids, [Some("m1"), Some("m2"), Some("m3"), Some("m4")]);
        assert_eq!(
            inv.units[0].changes(),
            &[put("bkt1", "a/1"), put("bkt2", "b/2")]
        );
        assert_eq!(inv.units[1].changes(), &[put("bkt1", "c/3")]);
        assert_eq!(
            inv.units[2].changes(),
            &[change("bkt2", "d e/4+5", "Object Deleted", Some(EB_TIME))]
        );
        assert!(inv.units[3].changes().is_empty());
        assert_eq!(
            inv.units[3].events().unwrap().notification.skipped[0].reason,
            SkipReason::TestEvent
        );
        assert_eq!(inv.sqs_message_ids_for_bucket("bkt1"), ["m1", "m2"]);
        assert_eq!(inv.sqs_message_ids_for_bucket("bkt2"), ["m1", "m3"]);
        assert!(inv.sqs_message_ids_for_bucket("bkt3").is_empty());
        assert_eq!(inv.failed_units().count(), 0);
    }

    #[test]
    fn sqs_unit_errors_are_per_record_and_permanent() {
        let good = notification(&[("bkt1", "k")]).to_string();
        let mut no_body = sqs_record("m2", "");
        no_body.as_object_mut().unwrap().remove("body");
        let subscription =
            json!({"Type": "SubscriptionConfirmation", "TopicArn": "arn", "Message": "confirm"});
        let batch = json!({"Records": [
            sqs_record("m1", &good),
            no_body,
            sqs_record("m3", "not json"),
            sqs_record("m4", "{\"hello\": 1}"),
            sqs_record("m5", &subscription.to_string()),
            sqs_record("m6", &sns_envelope("nope").to_string()),
            sqs_record("m7", &json!({"Type": "Notification", "TopicArn": "arn"}).to_string()),
            sqs_record("m8", &json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2", "detail": {}}).to_string()),
            sqs_record("m9", &sns_envelope(&sns_envelope("{}").to_string()).to_string()),
            sqs_record("m10", "[1]"),
        ]});
        let inv = decode_invocation(&batch).unwrap();
        assert_eq!(inv.units[0].changes(), &[put("bkt1", "k")]);
        let errors: Vec<_> = inv.units[1..]
            .iter()
            .map(|u| u.error().unwrap().clone())
            .collect();
        assert!(matches!(errors[0], UnitError::NoBody));
        assert!(matches!(
            errors[1],
            UnitError::NotJson {
                what: "SQS body",
                ..
            }
        ));
        assert_eq!(
            errors[2],
            UnitError::NotAnS3Event("no \"Records\" array".into())
        );
        assert_eq!(
            errors[3],
            UnitError::NotAnSnsNotification {
                message_type: "SubscriptionConfirmation".into()
            }
        );
        assert!(matches!(
            errors[4],
            UnitError::NotJson {
                what: "SNS Message",
                ..
            }
        ));
        assert_eq!(errors[5], UnitError::NoSnsMessage);
        assert_eq!(
            errors[6],
            UnitError::NotFromS3 {
                event_source: Some("aws.ec2".into())
            }
        );
        assert_eq!(
            errors[7],
            UnitError::NotAnS3Event("SNS envelope inside an SNS envelope".into())
        );
        assert_eq!(
            errors[8],
            UnitError::NotAnS3Event("expected a JSON object, got an array".into())
        );
        assert!(errors.iter().all(UnitError::is_permanent));
        assert_eq!(inv.failed_units().count(), 9);
        assert_eq!(inv.units[2].message_id.as_deref(), Some("m3"));
    }

    #[test]
    fn sns_invocation() {
        let e = json!({"Records": [{
            "EventSource": "aws:sns",
            "EventVersion": "1.0",
            "EventSubscriptionArn": "arn:aws:sns:us-east-1:123456789012:s3-events:sub",
            "Sns": sns_envelope(&notification(&[("bkt1", "x/y")]).to_string())
        }]});
        let inv = decode_invocation(&e).unwrap();
        assert_eq!(inv.kind, InvocationKind::Sns);
        assert_eq!(inv.units.len(), 1);
        assert_eq!(inv.units[0].changes(), &[put("bkt1", "x/y")]);
        assert!(inv.sqs_message_ids_for_bucket("bkt1").is_empty());
        assert_eq!(inv.units_for_bucket("bkt1").count(), 1);
    }

    #[test]
    fn sns_records_merge_and_a_bad_one_is_skipped() {
        let record =
            |message: &str| json!({"EventSource": "aws:sns", "Sns": sns_envelope(message)});
        let e = json!({"Records": [
            record(&notification(&[("bkt1", "a"), ("bkt1", "%zz")]).to_string()),
            record("garbage"),
            record(&eventbridge("Object Tags Added", "bkt2", "t").to_string()),
            record(&notification(&[("bkt2", "b")]).to_string()),
        ]});
        let inv = decode_invocation(&e).unwrap();
        let events = inv.units[0].events().unwrap();
        let key_none = ObjectChange {
            key: None,
            ..put("bkt1", "")
        };
        assert_eq!(
            events.notification.changes,
            [put("bkt1", "a"), key_none, put("bkt2", "b")]
        );
        assert_eq!(
            events.notification.undecodable_keys,
            [UndecodableKey {
                index: 1,
                raw_key: "%zz".into(),
                error: KeyDecodeError::BadEscape(0)
            }]
        );
        assert_eq!(events.notification.skipped.len(), 1);
        assert_eq!(events.notification.skipped[0].index, 2);
        assert!(matches!(
            events.notification.skipped[0].reason,
            SkipReason::Malformed { .. }
        ));
        assert_eq!(
            events.ignored,
            [IgnoredEvent {
                index: 3,
                bucket: Some("bkt2".into()),
                detail_type: "Object Tags Added".into()
            }]
        );
    }

    #[test]
    fn sns_unit_fails_when_no_record_decodes() {
        let e = json!({"Records": [{"EventSource": "aws:sns", "Sns": sns_envelope("garbage")}]});
        let inv = decode_invocation(&e).unwrap();
        assert!(matches!(
            inv.units[0].error(),
            Some(UnitError::NotJson {
                what: "SNS Message",
                ..
            })
        ));
        let e = json!({"Records": [{"EventSource": "aws:sns"}]});
        assert!(matches!(
            decode_invocation(&e).unwrap().units[0].error(),
            Some(UnitError::NotAnS3Event(_))
        ));
    }

    #[test]
    fn eventbridge_created_and_deleted() {
        for detail_type in ["Object Created", "Object Deleted"] {
            let inv =
                decode_invocation(&eventbridge(detail_type, "bkt1", "dir/a+b%2Fc:d.txt")).unwrap();
            assert_eq!(inv.kind, InvocationKind::EventBridge);
            assert_eq!(
                inv.units[0].changes(),
                &[change(
                    "bkt1",
                    "dir/a+b%2Fc:d.txt",
                    detail_type,
                    Some(EB_TIME)
                )]
            );
            assert_eq!(inv.units[0].changes()[0].folder(), Some("dir/"));
        }
    }

    /// An object that a lifecycle rule expires sends "Object Deleted" with reason
    /// "Lifecycle Expiration" (S3 as the requester, no size): a change, whatever the
    /// deletion type.
    #[test]
    fn eventbridge_lifecycle_expiration_is_a_change() {
        for deletion_type in ["Permanently Deleted", "Delete Marker Created"] {
            let mut event = eventbridge("Object Deleted", "bkt1", "logs/old.gz");
            event["detail"]["object"] =
                json!({"key": "logs/old.gz", "sequencer": "617b398000000000"});
            event["detail"]["requester"] = json!("s3.amazonaws.com");
            event["detail"]["reason"] = json!("Lifecycle Expiration");
            event["detail"]["deletion-type"] = json!(deletion_type);
            event["detail"]
                .as_object_mut()
                .unwrap()
                .remove("source-ip-address");
            let inv = decode_invocation(&event).unwrap();
            let events = inv.units[0].events().unwrap();
            assert_eq!(events.notification.changes.len(), 1, "{deletion_type}");
            let c = &events.notification.changes[0];
            assert_eq!(
                (c.bucket.as_str(), c.key.as_deref(), c.event_name.as_str()),
                ("bkt1", Some("logs/old.gz"), "Object Deleted"),
                "{deletion_type}"
            );
            assert_eq!(c.event_time_ms, Some(EB_TIME));
            assert!(events.notification.skipped.is_empty(), "{deletion_type}");
            assert!(events.ignored.is_empty(), "{deletion_type}");
        }
    }

    #[test]
    fn eventbridge_non_listing_types_are_ignored() {
        for detail_type in NOT_LISTING_CHANGES {
            let inv = decode_invocation(&eventbridge(detail_type, "bkt1", "k")).unwrap();
            let events = inv.units[0].events().unwrap();
            assert!(events.notification.changes.is_empty(), "{detail_type}");
            assert!(events.notification.skipped.is_empty(), "{detail_type}");
            assert_eq!(events.ignored[0].detail_type, detail_type);
            assert_eq!(events.ignored[0].bucket.as_deref(), Some("bkt1"));
        }
    }

    #[test]
    fn eventbridge_unknown_type_counts_as_a_change() {
        let inv = decode_invocation(&eventbridge("Object Renamed", "bkt1", "k")).unwrap();
        assert_eq!(
            inv.units[0].changes(),
            &[change("bkt1", "k", "Object Renamed", Some(EB_TIME))]
        );
    }

    #[test]
    fn eventbridge_malformed_and_foreign() {
        let mut no_key = eventbridge("Object Created", "bkt1", "k");
        no_key["detail"]["object"] = json!({});
        let mut bad_bucket = eventbridge("Object Created", "BAD", "k");
        bad_bucket["detail"]["bucket"]["name"] = json!("BAD");
        let mut no_detail = eventbridge("Object Created", "bkt1", "k");
        no_detail.as_object_mut().unwrap().remove("detail");
        let mut no_bucket = eventbridge("Object Created", "bkt1", "k");
        no_bucket["detail"]["bucket"] = json!(null);
        let mut numeric_type = eventbridge("Object Created", "bkt1", "k");
        numeric_type["detail-type"] = json!(3);
        let cases = [
            (no_key, "no detail.object.key", Some("bkt1")),
            (bad_bucket, "invalid bucket name \"BAD\"", None),
            (no_detail, "no \"detail\" object", None),
            (no_bucket, "no detail.bucket.name", None),
            (numeric_type, "no string \"detail-type\"", None),
        ];
        for (event, detail, bucket) in cases {
            let inv = decode_invocation(&event).unwrap();
            let events = inv.units[0].events().unwrap();
            assert!(events.notification.changes.is_empty());
            assert_eq!(
                events.notification.skipped,
                [SkippedRecord {
                    index: 0,
                    reason: SkipReason::Malformed {
                        detail: detail.into()
                    },
                    bucket: bucket.map(str::to_string)
                }]
            );
        }
        let mut foreign = eventbridge("Object Created", "bkt1", "k");
        foreign["source"] = json!("aws.ec2");
        let inv = decode_invocation(&foreign).unwrap();
        assert_eq!(
            inv.units[0].error().unwrap().to_string(),
            "EventBridge event from \"aws.ec2\", not aws.s3"
        );
        foreign.as_object_mut().unwrap().remove("source");
        let inv = decode_invocation(&foreign).unwrap();
        assert_eq!(
            inv.units[0].error().unwrap().to_string(),
            "EventBridge event from no source, not aws.s3"
        );
    }

    #[test]
    fn not_a_notification_at_all() {
        for payload in [json!(null), json!([1]), json!({}), json!({"Records": "x"})] {
            assert!(decode_invocation(&payload).is_err(), "{payload}");
        }
        // An empty batch is a direct notification with nothing in it.
        let inv = decode_invocation(&json!({"Records": []})).unwrap();
        assert_eq!(inv.kind, InvocationKind::Direct);
        assert!(inv.units[0].changes().is_empty());
    }

    #[test]
    fn grouping_by_bucket() {
        let batch = json!({"Records": [
            sqs_record("m1", &notification(&[("bkt2", "a"), ("bkt1", "b"), ("bkt2", "c")]).to_string()),
            sqs_record("m2", "garbage"),
            sqs_record("m3", &notification(&[("bkt2", "d")]).to_string()),
        ]});
        let inv = decode_invocation(&batch).unwrap();
        let groups = inv.changes_by_bucket();
        assert_eq!(groups.keys().copied().collect::<Vec<_>>(), ["bkt1", "bkt2"]);
        assert_eq!(groups["bkt1"].units, [0]);
        assert_eq!(groups["bkt2"].units, [0, 2]);
        let keys: Vec<_> = groups["bkt2"]
            .changes
            .iter()
            .map(|c| c.key.as_deref().unwrap())
            .collect();
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(
            inv.changes().map(|(u, _)| u).collect::<Vec<_>>(),
            [0, 0, 0, 2]
        );
        assert_eq!(inv.sqs_message_ids_for_bucket("bkt2"), ["m1", "m3"]);
    }

    #[test]
    fn duplicate_and_missing_message_ids() {
        let body = notification(&[("bkt1", "a")]).to_string();
        let mut anonymous = sqs_record("x", &body);
        anonymous.as_object_mut().unwrap().remove("messageId");
        let batch =
            json!({"Records": [sqs_record("m1", &body), sqs_record("m1", &body), anonymous]});
        let inv = decode_invocation(&batch).unwrap();
        assert_eq!(inv.sqs_message_ids_for_bucket("bkt1"), ["m1"]);
        assert_eq!(inv.units_for_bucket("bkt1").count(), 3);
        assert_eq!(inv.units[2].message_id, None);
    }
}
