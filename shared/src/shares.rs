//! File shares: which shares map a bucket, and what to refresh on each.

use crate::window::RefreshScope;
use std::fmt;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareKind {
    Nfs,
    Smb,
}

impl fmt::Display for ShareKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareKind::Nfs => "NFS",
            ShareKind::Smb => "SMB",
        })
    }
}

/// Where a share points: a bucket and a key prefix ("" or ending in '/').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareLocation {
    pub bucket: String,
    pub prefix: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "unsupported LocationARN {0:?}: expected arn:aws:s3:::BUCKET or arn:aws:s3:::BUCKET/PREFIX/"
)]
pub struct LocationError(pub String);

/// Parses `arn:aws:s3:::bucket` or `arn:aws:s3:::bucket/prefix/` (any partition).
///
/// Access-point and other ARNs name no bucket we can match events against.
pub fn parse_location_arn(arn: &str) -> Result<ShareLocation, LocationError> {
    let err = || LocationError(arn.to_string());
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some("s3"), Some(""), Some(""), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(err());
    };
    let (bucket, prefix) = match resource.split_once('/') {
        Some((bucket, prefix)) => (bucket, prefix),
        None => (resource, ""),
    };
    if bucket.is_empty() {
        return Err(err());
    }
    let mut prefix = prefix.to_string();
    // A prefix names a folder; the console writes it with a trailing slash, but be
    // lenient with one written without.
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(ShareLocation {
        bucket: bucket.to_string(),
        prefix,
    })
}

/// A file share, as described by the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileShare {
    pub arn: String,
    pub kind: ShareKind,
    pub gateway_arn: String,
    pub location: ShareLocation,
}

impl FileShare {
    /// Whether a change in `folder` (with trailing slash, "" for root) lies in this share.
    pub fn covers_folder(&self, folder: &str) -> bool {
        folder.starts_with(&self.location.prefix)
    }
}

/// One `RefreshCache` call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshPlan {
    pub share_arn: String,
    /// `FolderList`, relative to the share root ("/" is the root itself).
    pub folders: Vec<String>,
    pub recursive: bool,
}

/// The refreshes that cover `scope` in `bucket`: one per share of the bucket whose
/// prefix holds at least one changed folder. Each refresh covers the whole share,
/// recursively, which covers every changed key in it.
pub fn plan_refreshes(
    shares: &[FileShare],
    bucket: &str,
    scope: &RefreshScope,
) -> Vec<RefreshPlan> {
    shares
        .iter()
        .filter(|share| share.location.bucket == bucket)
        .filter(|share| match scope {
            RefreshScope::WholeBucket => true,
            RefreshScope::Folders(folders) => folders.iter().any(|f| share.covers_folder(f)),
        })
        .map(|share| RefreshPlan {
            share_arn: share.arn.clone(),
            folders: vec!["/".to_string()],
            recursive: true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(arn: &str, location: &str) -> FileShare {
        FileShare {
            arn: arn.to_string(),
            kind: ShareKind::Nfs,
            gateway_arn: "gw".to_string(),
            location: parse_location_arn(location).unwrap(),
        }
    }

    #[test]
    fn location_arns() {
        assert_eq!(
            parse_location_arn("arn:aws:s3:::my-bucket").unwrap(),
            ShareLocation {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            parse_location_arn("arn:aws:s3:::my-bucket/data/2024/").unwrap(),
            ShareLocation {
                bucket: "my-bucket".into(),
                prefix: "data/2024/".into()
            }
        );
        assert_eq!(
            parse_location_arn("arn:aws-cn:s3:::b/p").unwrap().prefix,
            "p/"
        );
        assert_eq!(parse_location_arn("arn:aws:s3:::b/").unwrap().prefix, "");
        for bad in [
            "",
            "arn:aws:s3:::",
            "arn:aws:s3:us-east-1:123456789012:accesspoint/ap",
            "s3://b",
            "arn:aws:sqs:::b",
        ] {
            assert!(parse_location_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_shares_only_for_keys_under_the_prefix() {
        let shares = vec![
            share("root", "arn:aws:s3:::b"),
            share("data", "arn:aws:s3:::b/data/"),
            share("other-bucket", "arn:aws:s3:::c"),
        ];
        let arns = |scope: RefreshScope| -> Vec<String> {
            plan_refreshes(&shares, "b", &scope)
                .into_iter()
                .map(|p| p.share_arn)
                .collect()
        };
        let folders = |f: &[&str]| RefreshScope::Folders(f.iter().map(|s| s.to_string()).collect());
        assert_eq!(arns(folders(&[""])), ["root"]);
        assert_eq!(arns(folders(&["database/"])), ["root"]);
        assert_eq!(arns(folders(&["data/x/"])), ["root", "data"]);
        assert_eq!(arns(folders(&["data/"])), ["root", "data"]);
        assert_eq!(arns(RefreshScope::WholeBucket), ["root", "data"]);
        assert!(arns(folders(&[])).is_empty());
    }
}
