//! Lenient decoding of S3 event notifications.
//!
//! AWS and moto disagree on details (moto: `eventTime` with microseconds and no `Z`,
//! no `userIdentity`, `/` in keys sent as `%2F`), and a strict schema would reject one
//! or the other. We read only the fields we need, treat everything else as optional,
//! and normalise: keys are form-URL-decoded and times become epoch milliseconds.

use crate::json::{kind_of, str_at};
use crate::window::Writer;
use chrono::{DateTime, NaiveDateTime};
use serde_json::Value;
use std::fmt;
use thiserror::Error;

/// An S3 object change that concerns the file shares of its bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange {
    pub bucket: String,
    /// The decoded key, or `None` when the key could not be decoded: then the change
    /// is treated as touching the whole bucket, so nothing is missed.
    pub key: Option<String>,
    pub event_name: String,
    /// `eventTime` in epoch ms, when present and parseable.
    pub event_time_ms: Option<i64>,
    /// The gateway that wrote it through one of its shares (`userIdentity.principalId`),
    /// whose own shares already show it; `None` for every other writer.
    pub writer: Option<Writer>,
}

impl ObjectChange {
    /// The folder that holds the key, with its trailing slash ("" for the bucket root),
    /// or `None` if the key is unknown.
    pub fn folder(&self) -> Option<&str> {
        self.key.as_deref().map(folder_of)
    }
}

/// The folder part of a key, with its trailing slash; "" for a key at the root.
pub fn folder_of(key: &str) -> &str {
    match key.rfind('/') {
        Some(i) => &key[..=i],
        None => "",
    }
}

/// Why a record (or a whole notification) produced no change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `s3:TestEvent`, sent when a notification is configured.
    TestEvent,
    /// A record without an `s3` section, bucket name or object key.
    Malformed { detail: String },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::TestEvent => f.write_str("s3:TestEvent"),
            SkipReason::Malformed { detail } => write!(f, "malformed record: {detail}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    pub index: usize,
    pub reason: SkipReason,
    /// The bucket, when the record named one.
    pub bucket: Option<String>,
}

/// A record whose key could not be decoded; its bucket is still refreshed in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndecodableKey {
    pub index: usize,
    pub raw_key: String,
    pub error: KeyDecodeError,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodedNotification {
    pub changes: Vec<ObjectChange>,
    pub skipped: Vec<SkippedRecord>,
    pub undecodable_keys: Vec<UndecodableKey>,
}

/// The payload is not an S3 event notification at all. Nothing in it can be
/// refreshed, and retrying will not change that.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not an S3 event notification: {0}")]
pub struct NotANotification(pub String);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyDecodeError {
    #[error("invalid percent-encoding at byte {0}")]
    BadEscape(usize),
    #[error("decoded key is not UTF-8")]
    NotUtf8,
}

/// Decodes an S3 event notification: `{"Records": [...]}` or an `s3:TestEvent`.
pub fn decode_notification(payload: &Value) -> Result<DecodedNotification, NotANotification> {
    let Some(object) = payload.as_object() else {
        return Err(NotANotification(format!(
            "expected a JSON object, got {}",
            kind_of(payload)
        )));
    };
    if object.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(DecodedNotification {
            skipped: vec![SkippedRecord {
                index: 0,
                reason: SkipReason::TestEvent,
                bucket: object
                    .get("Bucket")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }],
            ..Default::default()
        });
    }
    let records = match object.get("Records") {
        Some(Value::Array(records)) => records,
        Some(other) => {
            return Err(NotANotification(format!(
                "\"Records\" is {}, not an array",
                kind_of(other)
            )))
        }
        None => return Err(NotANotification("no \"Records\" array".to_string())),
    };
    let mut decoded = DecodedNotification::default();
    for (index, record) in records.iter().enumerate() {
        decode_record(index, record, &mut decoded);
    }
    Ok(decoded)
}

fn decode_record(index: usize, record: &Value, out: &mut DecodedNotification) {
    let malformed = |detail: &str, bucket: Option<String>| SkippedRecord {
        index,
        reason: SkipReason::Malformed {
            detail: detail.to_string(),
        },
        bucket,
    };
    if !record.is_object() {
        out.skipped.push(malformed("record is not an object", None));
        return;
    }
    let event_name = str_at(record, &["eventName"])
        .unwrap_or_default()
        .to_string();
    if event_name == "s3:TestEvent" || str_at(record, &["Event"]) == Some("s3:TestEvent") {
        out.skipped.push(SkippedRecord {
            index,
            reason: SkipReason::TestEvent,
            bucket: None,
        });
        return;
    }
    let Some(s3) = record.get("s3").filter(|v| v.is_object()) else {
        out.skipped.push(malformed("no \"s3\" section", None));
        return;
    };
    let bucket = match str_at(s3, &["bucket", "name"]) {
        Some(name) if is_plausible_bucket(name) => name.to_string(),
        Some(name) => {
            out.skipped
                .push(malformed(&format!("invalid bucket name {name:?}"), None));
            return;
        }
        None => {
            out.skipped.push(malformed("no s3.bucket.name", None));
            return;
        }
    };
    let Some(raw_key) = str_at(s3, &["object", "key"]) else {
        out.skipped
            .push(malformed("no s3.object.key", Some(bucket)));
        return;
    };
    let key = match decode_key(raw_key) {
        Ok(key) => Some(key),
        Err(error) => {
            out.undecodable_keys.push(UndecodableKey {
                index,
                raw_key: raw_key.to_string(),
                error,
            });
            None
        }
    };
    let event_time_ms = str_at(record, &["eventTime"]).and_then(parse_event_time);
    out.changes.push(ObjectChange {
        bucket,
        key,
        event_name,
        event_time_ms,
        writer: str_at(record, &["userIdentity", "principalId"]).and_then(Writer::from_principal),
    });
}

/// S3's bucket naming rules, loosely: 3 to 63 characters of lowercase letters, digits,
/// '.', '-' (and '_' for legacy buckets). Anything else cannot be a real bucket.
pub fn is_plausible_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Decodes an S3 event key: form-URL-encoded, so `+` is a space and `%XX` a byte.
pub fn decode_key(raw: &str) -> Result<String, KeyDecodeError> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return Err(KeyDecodeError::BadEscape(i));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|_| KeyDecodeError::NotUtf8)
}

/// Parses `eventTime` in either shape: AWS `2018-08-12T18:14:02.149Z`, or moto
/// `2024-05-01T10:00:00.123456` (no zone, meaning UTC). Returns epoch ms.
pub fn parse_event_time(text: &str) -> Option<i64> {
    if let Ok(with_zone) = DateTime::parse_from_rfc3339(text) {
        return Some(with_zone.timestamp_millis());
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc().timestamp_millis())
}

/// Formats epoch ms as S3 does (`2018-08-12T18:14:02.149Z`).
pub fn format_event_time(epoch_ms: i64) -> Option<String> {
    DateTime::from_timestamp_millis(epoch_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A record as AWS sends it (from the S3 documentation's example).
    fn aws_record(bucket: &str, key: &str) -> Value {
        json!({
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "testConfigRule",
                "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": format!("arn:aws:s3:::{bucket}")},
                "object": {"key": key, "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e", "sequencer": "0055AED6DCD90281E5"}
            }
        })
    }

    /// A record as moto 5 sends it.
    fn moto_record(bucket: &str, key: &str) -> Value {
        json!({
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-11-27T17:55:01.123456",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "s3-event-aggregator",
                "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
                "object": {"key": key, "size": 3, "eTag": "abc", "versionId": ""}
            }
        })
    }

    #[test]
    fn aws_shape_is_decoded() {
        let d = decode_notification(&json!({"Records": [aws_record("my-bucket", "a/b+c%3D.txt")]}))
            .unwrap();
        assert_eq!(d.changes.len(), 1);
        let c = &d.changes[0];
        assert_eq!(c.bucket, "my-bucket");
        assert_eq!(c.key.as_deref(), Some("a/b c=.txt"));
        assert_eq!(c.folder(), Some("a/"));
        assert_eq!(c.event_time_ms, Some(0));
        assert_eq!(c.event_name, "ObjectCreated:Put");
    }

    #[test]
    fn moto_shape_is_decoded_and_normalised() {
        let d =
            decode_notification(&json!({"Records": [moto_record("bkt1", "dir%2Fsub%2Ffile.txt")]}))
                .unwrap();
        let c = &d.changes[0];
        assert_eq!(c.key.as_deref(), Some("dir/sub/file.txt"));
        assert_eq!(c.folder(), Some("dir/sub/"));
        // 2026-11-27T17:55:01.123Z
        assert_eq!(c.event_time_ms, Some(1_795_802_101_123));
    }

    #[test]
    fn gateway_writes_are_changes_that_name_their_gateway() {
        let mut r = aws_record("bkt1", "k");
        r["userIdentity"]["principalId"] = json!("AWS:AROAEXAMPLE:StorageGateway-sgw-12A3456B");
        let mut unnamed = aws_record("bkt1", "k2");
        unnamed["userIdentity"]["principalId"] = json!("AWS:AROAEXAMPLE:StorageGateway");
        let d = decode_notification(&json!({"Records": [r, unnamed, aws_record("bkt1", "k3")]}))
            .unwrap();
        assert!(d.skipped.is_empty());
        let writers: Vec<_> = d.changes.iter().map(|c| c.writer.clone()).collect();
        assert_eq!(
            writers,
            [
                Some(Writer::Gateway("sgw-12a3456b".into())),
                Some(Writer::UnknownGateway),
                None
            ]
        );
    }

    #[test]
    fn test_event_is_skipped() {
        let e = json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-01-01T00:00:00.000Z", "Bucket": "bkt1", "RequestId": "x", "HostId": "y"});
        let d = decode_notification(&e).unwrap();
        assert!(d.changes.is_empty());
        assert_eq!(d.skipped[0].reason, SkipReason::TestEvent);
    }

    #[test]
    fn missing_parts_are_skipped_per_record() {
        let mut no_key = aws_record("bkt1", "k");
        no_key["s3"]["object"] = json!({});
        let mut null_bucket = aws_record("bkt1", "k");
        null_bucket["s3"]["bucket"]["name"] = Value::Null;
        let e = json!({"Records": [{"eventName": "ObjectCreated:Put"}, no_key, null_bucket, 7, aws_record("bkt2", "ok")]});
        let d = decode_notification(&e).unwrap();
        assert_eq!(d.changes.len(), 1);
        assert_eq!(d.changes[0].bucket, "bkt2");
        assert_eq!(d.skipped.len(), 4);
        assert!(d
            .skipped
            .iter()
            .all(|s| matches!(s.reason, SkipReason::Malformed { .. })));
    }

    #[test]
    fn not_a_notification() {
        assert!(decode_notification(&json!({})).is_err());
        assert!(decode_notification(&json!({"Records": "x"})).is_err());
        assert!(decode_notification(&json!([1, 2])).is_err());
        assert!(decode_notification(&json!(null)).is_err());
    }

    #[test]
    fn bad_key_encoding_keeps_the_bucket() {
        let d = decode_notification(
            &json!({"Records": [aws_record("bkt1", "a%zzb"), aws_record("bkt1", "%FF")]}),
        )
        .unwrap();
        assert_eq!(d.changes.len(), 2);
        assert!(d
            .changes
            .iter()
            .all(|c| c.key.is_none() && c.bucket == "bkt1"));
        assert_eq!(d.undecodable_keys[0].error, KeyDecodeError::BadEscape(1));
        assert_eq!(d.undecodable_keys[1].error, KeyDecodeError::NotUtf8);
    }

    #[test]
    fn invalid_bucket_names_are_malformed() {
        for name in ["", "ab", "UPPER", "has space", &"x".repeat(64)] {
            let d = decode_notification(&json!({"Records": [aws_record(name, "k")]})).unwrap();
            assert!(d.changes.is_empty(), "{name}");
        }
    }

    #[test]
    fn event_times() {
        assert_eq!(
            parse_event_time("2018-08-12T18:14:02.149Z"),
            Some(1_534_097_642_149)
        );
        assert_eq!(
            parse_event_time("2018-08-12T18:14:02.149000"),
            Some(1_534_097_642_149)
        );
        assert_eq!(
            parse_event_time("2018-08-12T18:14:02"),
            Some(1_534_097_642_000)
        );
        assert_eq!(parse_event_time("yesterday"), None);
        assert_eq!(parse_event_time(""), None);
        assert_eq!(
            parse_event_time("2018-08-12T20:14:02.149+02:00"),
            Some(1_534_097_642_149)
        );
        assert_eq!(
            format_event_time(1_534_097_642_149).as_deref(),
            Some("2018-08-12T18:14:02.149Z")
        );
    }

    #[test]
    fn folders() {
        assert_eq!(folder_of("a/b/c"), "a/b/");
        assert_eq!(folder_of("c"), "");
        assert_eq!(folder_of("a/"), "a/");
    }
}
