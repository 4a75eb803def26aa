//! Share locations that name an S3 access point instead of a bucket.
//!
//! A file share's `LocationARN` is one of (Storage Gateway `CreateNFSFileShare`):
//!
//! * a bucket: `arn:aws:s3:::bucket` or `arn:aws:s3:::bucket/prefix/`;
//! * an access point ARN: `arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME`, optionally
//!   followed by `/prefix/`;
//! * an access point alias used as a bucket name: `arn:aws:s3:::NAME-…-s3alias`
//!   (optionally `/prefix/`). The Storage Gateway documentation also shows the alias
//!   alone, without `arn:aws:s3:::`; both are read.
//!
//! S3 events name the bucket, so an access point location says nothing until S3
//! Control has told which bucket the access point belongs to (the refresher does that,
//! [`crate::refresher`]). This module only reads the ARNs: no I/O.

use crate::shares::{parse_location_arn, ShareLocation};
use std::fmt;
use thiserror::Error;

/// The suffix that S3 reserves for access point aliases: no bucket name ends with it.
pub const ALIAS_SUFFIX: &str = "-s3alias";

/// An access point ARN without its prefix: `arn:PARTITION:s3:REGION:ACCOUNT:accesspoint/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessPointArn {
    pub partition: String,
    pub region: String,
    pub account: String,
    pub name: String,
}

impl fmt::Display for AccessPointArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:s3:{}:{}:accesspoint/{}",
            self.partition, self.region, self.account, self.name
        )
    }
}

/// What a share's `LocationARN` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocationRef {
    /// A bucket (and prefix): matched against events as it is.
    Bucket(ShareLocation),
    /// An access point by ARN; `prefix` is "" or ends with '/'.
    AccessPoint {
        access_point: AccessPointArn,
        prefix: String,
    },
    /// An access point by alias (`NAME-…-s3alias`); `prefix` is "" or ends with '/'.
    Alias { alias: String, prefix: String },
}

impl LocationRef {
    /// The key prefix under the share root ("" or ending in '/'), whatever the form.
    pub fn prefix(&self) -> &str {
        match self {
            LocationRef::Bucket(location) => &location.prefix,
            LocationRef::AccessPoint { prefix, .. } | LocationRef::Alias { prefix, .. } => prefix,
        }
    }
}

/// Why a `LocationARN` names no location that events can be matched against.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LocationRefError {
    /// Neither a bucket, an access point ARN nor an alias (for example an S3 on
    /// Outposts or a multi-region access point ARN, or not an ARN at all).
    #[error(
        "unsupported LocationARN {0:?}: expected arn:aws:s3:::BUCKET[/PREFIX/], \
         arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME[/PREFIX/] or an access point alias"
    )]
    Unsupported(String),
    /// An `arn:…:s3:REGION:ACCOUNT:…` ARN that is not a well-formed access point ARN.
    #[error("malformed access point ARN {arn:?}: {reason}")]
    MalformedAccessPoint { arn: String, reason: &'static str },
}

/// Reads a share's `LocationARN` (any partition).
pub fn parse_location(location_arn: &str) -> Result<LocationRef, LocationRefError> {
    if !location_arn.starts_with("arn:") {
        // The documented bare alias, `NAME-…-s3alias[/prefix/]`.
        let (name, prefix) = split_resource(location_arn);
        if is_alias(name) {
            return Ok(LocationRef::Alias {
                alias: name.to_string(),
                prefix: normalise_prefix(prefix),
            });
        }
        return Err(LocationRefError::Unsupported(location_arn.to_string()));
    }
    if let Ok(location) = parse_location_arn(location_arn) {
        if is_alias(&location.bucket) {
            return Ok(LocationRef::Alias {
                alias: location.bucket,
                prefix: location.prefix,
            });
        }
        return Ok(LocationRef::Bucket(location));
    }
    let mut parts = location_arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("s3"), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(LocationRefError::Unsupported(location_arn.to_string()));
    };
    let Some(rest) = resource.strip_prefix("accesspoint/") else {
        return Err(LocationRefError::Unsupported(location_arn.to_string()));
    };
    let malformed = |reason| LocationRefError::MalformedAccessPoint {
        arn: location_arn.to_string(),
        reason,
    };
    if partition.is_empty() {
        return Err(malformed("no partition"));
    }
    if region.is_empty() {
        return Err(malformed("no region"));
    }
    if account.is_empty() || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("the account is not a 12-digit account id"));
    }
    let (name, prefix) = split_resource(rest);
    if name.is_empty() {
        return Err(malformed("no access point name"));
    }
    Ok(LocationRef::AccessPoint {
        access_point: AccessPointArn {
            partition: partition.to_string(),
            region: region.to_string(),
            account: account.to_string(),
            name: name.to_string(),
        },
        prefix: normalise_prefix(prefix),
    })
}

/// Whether a bucket-position name is an access point alias (`NAME-…-s3alias`).
pub fn is_alias(name: &str) -> bool {
    name.len() > ALIAS_SUFFIX.len() && name.ends_with(ALIAS_SUFFIX)
}

/// The account and region of a Storage Gateway ARN
/// (`arn:PARTITION:storagegateway:REGION:ACCOUNT:share/share-XXXXXXXX`), where an alias
/// share's access point is looked up first.
pub fn share_account_region(share_arn: &str) -> Option<(&str, &str)> {
    let mut parts = share_arn.splitn(6, ':');
    let (
        Some("arn"),
        Some(partition),
        Some("storagegateway"),
        Some(region),
        Some(account),
        Some(_),
    ) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    )
    else {
        return None;
    };
    (!partition.is_empty() && !region.is_empty() && !account.is_empty())
        .then_some((account, region))
}

/// `name/prefix…` → (`name`, `prefix…`).
fn split_resource(resource: &str) -> (&str, &str) {
    resource.split_once('/').unwrap_or((resource, ""))
}

/// As [`parse_location_arn`] does: "" stays "", "/" is the root, and a prefix written
/// without its trailing slash still names a folder.
fn normalise_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix == "/" {
        String::new()
    } else if prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ap(region: &str, account: &str, name: &str) -> AccessPointArn {
        AccessPointArn {
            partition: "aws".into(),
            region: region.into(),
            account: account.into(),
            name: name.into(),
        }
    }

    #[test]
    fn buckets_stay_buckets() {
        assert_eq!(
            parse_location("arn:aws:s3:::my-bucket/data/").unwrap(),
            LocationRef::Bucket(ShareLocation {
                bucket: "my-bucket".into(),
                prefix: "data/".into()
            })
        );
        assert_eq!(
            parse_location("arn:aws:s3:::b").unwrap().prefix(),
            "",
            "a whole bucket"
        );
    }

    #[test]
    fn access_point_arns() {
        let arn = "arn:aws:s3:eu-west-1:123456789012:accesspoint/my-ap";
        assert_eq!(
            parse_location(arn).unwrap(),
            LocationRef::AccessPoint {
                access_point: ap("eu-west-1", "123456789012", "my-ap"),
                prefix: String::new()
            }
        );
        assert_eq!(
            ap("eu-west-1", "123456789012", "my-ap").to_string(),
            arn,
            "Display gives the ARN back"
        );
        for (location, prefix) in [
            (
                "arn:aws:s3:us-east-1:123456789012:accesspoint/ap/data/2024/",
                "data/2024/",
            ),
            (
                "arn:aws:s3:us-east-1:123456789012:accesspoint/ap/data",
                "data/",
            ),
            ("arn:aws:s3:us-east-1:123456789012:accesspoint/ap/", ""),
        ] {
            let parsed = parse_location(location).unwrap();
            assert_eq!(parsed.prefix(), prefix, "{location}");
            assert!(
                matches!(&parsed, LocationRef::AccessPoint { access_point, .. } if access_point.name == "ap"),
                "{location}: {parsed:?}"
            );
        }
        let cn = parse_location("arn:aws-cn:s3:cn-north-1:123456789012:accesspoint/x").unwrap();
        assert!(
            matches!(&cn, LocationRef::AccessPoint { access_point, .. }
                if access_point.partition == "aws-cn" && access_point.region == "cn-north-1"),
            "{cn:?}"
        );
    }

    #[test]
    fn aliases_in_bucket_position_or_alone() {
        let alias = "my-ap-abcdefghijklmnopqrstuvwxyz0123use1a-s3alias";
        for (location, prefix) in [
            (format!("arn:aws:s3:::{alias}"), ""),
            (format!("arn:aws:s3:::{alias}/p/"), "p/"),
            (format!("arn:aws-us-gov:s3:::{alias}/p"), "p/"),
            (alias.to_string(), ""),
            (format!("{alias}/q/r/"), "q/r/"),
        ] {
            assert_eq!(
                parse_location(&location).unwrap(),
                LocationRef::Alias {
                    alias: alias.to_string(),
                    prefix: prefix.to_string()
                },
                "{location}"
            );
        }
        assert!(!is_alias("-s3alias"));
        assert!(!is_alias("bucket"));
        assert!(!is_alias("bucket-s3alias-not"));
    }

    #[test]
    fn other_locations_are_typed_errors() {
        for bad in [
            "",
            "bucket",
            "s3://bucket",
            "arn:aws:s3:::",
            "arn:aws:sqs:us-east-1:123456789012:q",
            "arn:aws:s3-outposts:us-west-2:123456789012:outpost/op-1/accesspoint/ap",
            "arn:aws:s3::123456789012:accesspoint/mfzwi23gnjvgw.mrap",
            "arn:aws:s3:us-east-1:123456789012:bucket/b",
        ] {
            let err = parse_location(bad).unwrap_err();
            match err {
                LocationRefError::Unsupported(ref arn) => assert_eq!(arn, bad),
                LocationRefError::MalformedAccessPoint { .. } if bad.contains("mrap") => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
        for (bad, reason) in [
            ("arn:aws:s3::123456789012:accesspoint/ap", "no region"),
            (
                "arn:aws:s3:us-east-1::accesspoint/ap",
                "the account is not a 12-digit account id",
            ),
            (
                "arn:aws:s3:us-east-1:acct:accesspoint/ap",
                "the account is not a 12-digit account id",
            ),
            (
                "arn:aws:s3:us-east-1:123456789012:accesspoint/",
                "no access point name",
            ),
            (
                "arn::s3:us-east-1:123456789012:accesspoint/ap",
                "no partition",
            ),
        ] {
            assert_eq!(
                parse_location(bad).unwrap_err(),
                LocationRefError::MalformedAccessPoint {
                    arn: bad.to_string(),
                    reason
                }
            );
        }
    }

    #[test]
    fn share_arns_give_account_and_region() {
        assert_eq!(
            share_account_region(
                "arn:aws:storagegateway:eu-west-2:111122223333:share/share-ABCDEF12"
            ),
            Some(("111122223333", "eu-west-2"))
        );
        assert_eq!(share_account_region("share-1"), None);
        assert_eq!(share_account_region("arn:aws:s3:::b"), None);
        assert_eq!(
            share_account_region("arn:aws:storagegateway:::share/x"),
            None
        );
    }
}
