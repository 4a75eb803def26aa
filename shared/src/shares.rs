//! File shares: which shares map a bucket, and what to refresh on each.

use crate::scheduler::Listing;
use crate::window::{ChangeSet, Writer};
use std::collections::BTreeSet;
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

    /// The gateway's id, the last part of its ARN (`.../gateway/sgw-12A3456B`).
    pub fn gateway_id(&self) -> &str {
        self.gateway_arn
            .rsplit_once('/')
            .map_or(self.gateway_arn.as_str(), |(_, id)| id)
    }
}

/// One `RefreshCache` call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshPlan {
    pub share_arn: String,
    /// `FolderList`, relative to the share root: "/" is the root, else "/a/b".
    pub folders: Vec<String>,
    pub recursive: bool,
}

pub use crate::scheduler::MAX_FOLDER_LIST;

/// The refreshes that cover `changes` in `bucket`, share by share.
///
/// A share whose prefix holds no changed folder gets none, and neither does a share on
/// the gateway that wrote a change through it (its cache already shows it): a change
/// written by a gateway whose id is unknown is left out only when all the bucket's
/// shares are on one gateway. The whole bucket is one recursive refresh of each share's
/// root. Changed folders are refreshed as narrowly as [`plan_folders`] can while still
/// making every change visible.
pub fn plan_refreshes(shares: &[FileShare], bucket: &str, changes: &ChangeSet) -> Vec<RefreshPlan> {
    let mut plans = Vec::new();
    for (share, needed) in needed_per_share(shares, bucket, changes) {
        let calls = match needed {
            Needed::WholeShare => vec![FolderRefresh {
                folders: vec![ROOT.to_string()],
                recursive: true,
            }],
            Needed::Folders(relative) => plan_folders(&relative),
        };
        plans.extend(calls.into_iter().map(|c| RefreshPlan {
            share_arn: share.arn.clone(),
            folders: c.folders,
            recursive: c.recursive,
        }));
    }
    plans
}

/// What changed on one share: its whole tree, or these folders (relative to the share
/// root, with a trailing slash; never empty).
enum Needed<'a> {
    WholeShare,
    Folders(BTreeSet<&'a str>),
}

/// The shares of `bucket` that `changes` concern, with what changed on each: not the
/// shares outside whose prefix every change lies, nor those on the gateway that wrote
/// them (for an unnamed writer: when all the bucket's shares are on one gateway).
fn needed_per_share<'a>(
    shares: &'a [FileShare],
    bucket: &str,
    changes: &'a ChangeSet,
) -> Vec<(&'a FileShare, Needed<'a>)> {
    let bucket_shares: Vec<&FileShare> = shares
        .iter()
        .filter(|s| s.location.bucket == bucket)
        .collect();
    let all_on_one_gateway = on_one_gateway(&bucket_shares);
    let mut needed = Vec::new();
    for share in bucket_shares {
        let needs = |writer: &Writer| !writer.wrote_through(share.gateway_id(), all_on_one_gateway);
        let mut folders: BTreeSet<&str> = changes.folders.iter().map(String::as_str).collect();
        let mut whole = changes.whole_bucket;
        for change in changes.gateway_writes.iter().filter(|c| needs(&c.writer)) {
            match &change.folder {
                Some(folder) => {
                    folders.insert(folder);
                }
                None => whole = true,
            }
        }
        if whole {
            needed.push((share, Needed::WholeShare));
            continue;
        }
        let relative: BTreeSet<&str> = folders
            .iter()
            .filter_map(|f| f.strip_prefix(share.location.prefix.as_str()))
            .collect();
        if !relative.is_empty() {
            needed.push((share, Needed::Folders(relative)));
        }
    }
    needed
}

/// What one share needs listed for a set of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareListings {
    pub share_arn: String,
    /// The share's prefix in the bucket.
    pub prefix: String,
    pub listings: Vec<Listing>,
}

/// The listings that make `changes` in `bucket` visible, share by share: every
/// changed folder and every ancestor up to the share root, each listed on its own
/// (non-recursive), or the share's whole tree for a change of unknown place. The same
/// shares as [`plan_refreshes`] (outside a share's prefix or written through its own
/// gateway: none); the scheduler ([`crate::scheduler`]) cuts them into calls.
pub fn plan_share_listings(
    shares: &[FileShare],
    bucket: &str,
    changes: &ChangeSet,
) -> Vec<ShareListings> {
    needed_per_share(shares, bucket, changes)
        .into_iter()
        .map(|(share, needed)| ShareListings {
            share_arn: share.arn.clone(),
            prefix: share.location.prefix.clone(),
            listings: match needed {
                Needed::WholeShare => vec![Listing::subtree(ROOT)],
                Needed::Folders(relative) => {
                    let mut listed: BTreeSet<&str> = BTreeSet::new();
                    for folder in relative {
                        listed.insert(folder);
                        listed.extend(ancestors(folder));
                    }
                    listed
                        .into_iter()
                        .map(|f| Listing::folder(folder_path(f)))
                        .collect()
                }
            },
        })
        .collect()
}

fn on_one_gateway(shares: &[&FileShare]) -> bool {
    let gateways: BTreeSet<String> = shares
        .iter()
        .map(|s| s.gateway_id().to_ascii_lowercase())
        .collect();
    gateways.len() <= 1
}

const ROOT: &str = "/";

/// One `RefreshCache` call's `FolderList` and `Recursive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderRefresh {
    pub folders: Vec<String>,
    pub recursive: bool,
}

/// The calls that make changes in `changed` (folders relative to a share root, with a
/// trailing slash; "" is the root) visible through the share.
///
/// A non-recursive refresh of a folder re-lists its objects and its direct
/// subfolders. A new object in a folder that did not exist before shows only if its
/// folder appears in its parent's listing, and the parent in the grandparent's, up to
/// the root; a deleted last object likewise makes its folder vanish from the parent.
/// So the first choice is one non-recursive call on every changed folder and all of
/// its ancestors: it lists only those folders, never their other subtrees.
///
/// When that is more than 50 folders, changed folders are collapsed into common
/// ancestors (the deepest one first) and refreshed recursively, which covers their
/// subtrees; a second, non-recursive call lists the ancestors of those, so that the
/// collapsed folders themselves show up. At worst this is one recursive refresh of the
/// root. A share takes two refreshes at a time, so two calls fit.
pub fn plan_folders(changed: &BTreeSet<&str>) -> Vec<FolderRefresh> {
    let mut listed: BTreeSet<&str> = BTreeSet::new();
    for folder in changed {
        listed.insert(folder);
        listed.extend(ancestors(folder));
    }
    if listed.len() <= MAX_FOLDER_LIST {
        return vec![FolderRefresh {
            folders: listed.into_iter().map(folder_path).collect(),
            recursive: false,
        }];
    }
    let mut subtrees = outermost(changed.iter().copied());
    loop {
        let above = ancestors_outside(&subtrees);
        if subtrees.len() <= MAX_FOLDER_LIST && above.len() <= MAX_FOLDER_LIST {
            let recursive = FolderRefresh {
                folders: subtrees.into_iter().map(folder_path).collect(),
                recursive: true,
            };
            if above.is_empty() {
                return vec![recursive];
            }
            return vec![
                FolderRefresh {
                    folders: above.into_iter().map(folder_path).collect(),
                    recursive: false,
                },
                recursive,
            ];
        }
        // Replace the deepest folder by its parent; the root has none, and a set
        // that holds the root is the root alone.
        let Some(deepest) = subtrees.iter().copied().max_by_key(|f| (depth(f), *f)) else {
            return vec![FolderRefresh {
                folders: vec![ROOT.to_string()],
                recursive: true,
            }];
        };
        subtrees.remove(deepest);
        subtrees.insert(parent(deepest).unwrap_or(""));
        subtrees = outermost(subtrees.into_iter());
    }
}

/// "a/b/" → ["", "a/"]; "" → [].
fn ancestors(folder: &str) -> impl Iterator<Item = &str> {
    folder
        .match_indices('/')
        .map(move |(i, _)| &folder[..=i])
        .filter(move |a| a.len() < folder.len())
        .chain((!folder.is_empty()).then_some(""))
}

fn parent(folder: &str) -> Option<&str> {
    if folder.is_empty() {
        return None;
    }
    let trimmed = &folder[..folder.len() - 1];
    Some(match trimmed.rfind('/') {
        Some(i) => &folder[..=i],
        None => "",
    })
}

fn depth(folder: &str) -> usize {
    folder.matches('/').count()
}

/// The folders of `set` that no other folder of the set contains.
fn outermost<'a>(set: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
    let all: BTreeSet<&str> = set.collect();
    all.iter()
        .copied()
        .filter(|f| !ancestors(f).any(|a| all.contains(a)))
        .collect()
}

/// The ancestors of `subtrees` that none of them contains.
fn ancestors_outside<'a>(subtrees: &BTreeSet<&'a str>) -> BTreeSet<&'a str> {
    subtrees
        .iter()
        .flat_map(|f| ancestors(f))
        .filter(|a| !subtrees.contains(a))
        .collect()
}

/// "" → "/"; "a/b/" → "/a/b" (FolderList: leading slash, no trailing slash).
fn folder_path(folder: &str) -> String {
    format!("/{}", folder.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(arn: &str, location: &str) -> FileShare {
        share_on(
            "arn:aws:storagegateway:us-east-1:111122223333:gateway/sgw-00000000",
            arn,
            location,
        )
    }

    fn share_on(gateway_arn: &str, arn: &str, location: &str) -> FileShare {
        FileShare {
            arn: arn.to_string(),
            kind: ShareKind::Nfs,
            gateway_arn: gateway_arn.to_string(),
            location: parse_location_arn(location).unwrap(),
        }
    }

    const GATEWAY_A: &str = "arn:aws:storagegateway:us-east-1:111122223333:gateway/sgw-AAAA1111";
    const GATEWAY_B: &str = "arn:aws:storagegateway:eu-west-1:111122223333:gateway/sgw-BBBB2222";

    fn written_by(writer: Writer, folders: &[Option<&str>]) -> ChangeSet {
        let mut changes = ChangeSet::default();
        for folder in folders {
            changes.add_gateway_write(&writer, *folder);
        }
        changes
    }

    fn refreshed(shares: &[FileShare], changes: &ChangeSet) -> Vec<(String, Vec<String>)> {
        plan_refreshes(shares, "b", changes)
            .into_iter()
            .map(|p| (p.share_arn, p.folders))
            .collect()
    }

    #[test]
    fn a_gateway_write_refreshes_every_share_but_the_writers() {
        let two_sites = [
            share_on(GATEWAY_A, "a-root", "arn:aws:s3:::b"),
            share_on(GATEWAY_A, "a-data", "arn:aws:s3:::b/data/"),
            share_on(GATEWAY_B, "b-root", "arn:aws:s3:::b"),
        ];
        assert_eq!(two_sites[0].gateway_id(), "sgw-AAAA1111");
        let by_a = written_by(Writer::Gateway("sgw-aaaa1111".into()), &[Some("data/x/")]);
        assert_eq!(
            refreshed(&two_sites, &by_a),
            [(
                "b-root".to_string(),
                vec!["/".to_string(), "/data".into(), "/data/x".into()]
            )]
        );
        // Too many of A's folders to keep: B's share is refreshed whole, A's not at all.
        let anywhere_by_a = written_by(Writer::Gateway("sgw-aaaa1111".into()), &[None]);
        assert_eq!(
            refreshed(&two_sites, &anywhere_by_a),
            [("b-root".to_string(), vec!["/".to_string()])]
        );
        // A gateway that has no share of the bucket: every share.
        let by_other = written_by(Writer::Gateway("sgw-cccc3333".into()), &[Some("")]);
        assert_eq!(refreshed(&two_sites, &by_other).len(), 2);
        // No id: every share, since two gateways serve the bucket.
        let unnamed = written_by(Writer::UnknownGateway, &[Some("data/")]);
        assert_eq!(refreshed(&two_sites, &unnamed).len(), 3);
        // Mixed with a plain change: the writer's shares get the plain folder only.
        let mut mixed = by_a.clone();
        mixed.add_folder("logs/");
        assert_eq!(
            refreshed(&two_sites, &mixed),
            [
                ("a-root".to_string(), vec!["/".to_string(), "/logs".into()]),
                (
                    "b-root".to_string(),
                    vec![
                        "/".to_string(),
                        "/data".into(),
                        "/data/x".into(),
                        "/logs".into()
                    ]
                )
            ]
        );
    }

    #[test]
    fn a_write_through_the_only_gateway_refreshes_nothing() {
        let one_site = [
            share_on(GATEWAY_A, "a-root", "arn:aws:s3:::b"),
            share_on(GATEWAY_A, "a-data", "arn:aws:s3:::b/data/"),
            // Another bucket's share on another gateway does not count.
            share_on(GATEWAY_B, "elsewhere", "arn:aws:s3:::c"),
        ];
        let by_a = written_by(
            Writer::Gateway("sgw-AAAA1111".into()),
            &[Some("data/"), None],
        );
        assert!(refreshed(&one_site, &by_a).is_empty());
        let unnamed = written_by(Writer::UnknownGateway, &[Some("data/"), None]);
        assert!(refreshed(&one_site, &unnamed).is_empty());
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
        let arns = |scope: ChangeSet| -> Vec<String> {
            plan_refreshes(&shares, "b", &scope)
                .into_iter()
                .map(|p| p.share_arn)
                .collect()
        };
        let folders = |f: &[&str]| ChangeSet {
            folders: f.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(arns(folders(&[""])), ["root"]);
        assert_eq!(arns(folders(&["database/"])), ["root"]);
        assert_eq!(arns(folders(&["data/x/"])), ["root", "data"]);
        assert_eq!(arns(folders(&["data/"])), ["root", "data"]);
        assert_eq!(arns(ChangeSet::whole()), ["root", "data"]);
        assert!(arns(folders(&[])).is_empty());
    }

    fn plan(changed: &[&str]) -> Vec<FolderRefresh> {
        plan_folders(&changed.iter().copied().collect())
    }

    fn non_recursive(folders: &[&str]) -> FolderRefresh {
        FolderRefresh {
            folders: folders.iter().map(|f| f.to_string()).collect(),
            recursive: false,
        }
    }

    #[test]
    fn changed_folders_and_their_ancestors_non_recursively() {
        assert_eq!(plan(&[""]), [non_recursive(&["/"])]);
        assert_eq!(
            plan(&["a/b/c/"]),
            [non_recursive(&["/", "/a", "/a/b", "/a/b/c"])]
        );
        assert_eq!(
            plan(&["a/b/", "a/c/", "x/"]),
            [non_recursive(&["/", "/a", "/a/b", "/a/c", "/x"])]
        );
    }

    /// Every changed folder and each of its ancestors is listed by some call, and
    /// each call fits `FolderList`.
    fn assert_covers(changed: &BTreeSet<&str>, calls: &[FolderRefresh]) {
        assert!((1..=2).contains(&calls.len()), "{calls:?}");
        for call in calls {
            assert!(
                (1..=MAX_FOLDER_LIST).contains(&call.folders.len()),
                "{call:?}"
            );
            assert!(call
                .folders
                .iter()
                .all(|f| f == "/" || (f.starts_with('/') && !f.ends_with('/'))));
        }
        let listed = |folder: &str| {
            calls.iter().any(|c| {
                c.folders.iter().any(|path| {
                    let named = match path.as_str() {
                        "/" => String::new(),
                        p => format!("{}/", &p[1..]),
                    };
                    if c.recursive {
                        folder.starts_with(&named)
                    } else {
                        folder == named
                    }
                })
            })
        };
        for folder in changed {
            assert!(listed(folder), "{folder} not listed by {calls:?}");
            for a in ancestors(folder) {
                assert!(
                    listed(a),
                    "ancestor {a:?} of {folder} not listed by {calls:?}"
                );
            }
        }
    }

    #[test]
    fn over_fifty_collapse_to_common_ancestors() {
        // 60 leaves under two parents: fewer, wider subtrees, and the root above them.
        let leaves: Vec<String> = (0..60).map(|i| format!("p{}/leaf{i:02}/", i % 2)).collect();
        let changed: BTreeSet<&str> = leaves.iter().map(String::as_str).collect();
        let calls = plan_folders(&changed);
        assert_covers(&changed, &calls);
        assert!(calls[1].recursive && calls[1].folders.iter().all(|f| f != "/"));
        // 60 folders at the root collapse into the root itself.
        let top: Vec<String> = (0..60).map(|i| format!("t{i:02}/")).collect();
        let changed: BTreeSet<&str> = top.iter().map(String::as_str).collect();
        assert_eq!(
            plan_folders(&changed),
            [FolderRefresh {
                folders: vec!["/".into()],
                recursive: true
            }]
        );
    }

    #[test]
    fn every_plan_covers_its_changes() {
        // A small deterministic generator: sets of up to 120 folders, up to 6 deep.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..300 {
            let count = 1 + next(120);
            let owned: Vec<String> = (0..count)
                .map(|_| (0..next(7)).map(|_| format!("f{}/", next(4))).collect())
                .collect();
            let changed: BTreeSet<&str> = owned.iter().map(String::as_str).collect();
            assert_covers(&changed, &plan_folders(&changed));
        }
    }

    #[test]
    fn deep_chains_collapse_until_both_calls_fit() {
        // One folder 60 levels deep: 61 folders to list.
        let deep: String = (0..60).map(|i| format!("d{i}/")).collect();
        let calls = plan(&[deep.as_str()]);
        assert_eq!(calls.len(), 2);
        assert!(calls
            .iter()
            .all(|c| !c.folders.is_empty() && c.folders.len() <= MAX_FOLDER_LIST));
        assert!(!calls[0].recursive && calls[1].recursive);
        assert_eq!(calls[0].folders[0], "/");
        // The recursive call covers the changed folder, and the listed ancestors reach it.
        let top = &calls[1].folders[0];
        assert!(format!("/{deep}").starts_with(&format!("{top}/")));
        assert_eq!(calls[0].folders.len() + 1, top.matches('/').count() + 1);
    }

    #[test]
    fn shares_get_their_relative_folders() {
        let shares = vec![
            share("root", "arn:aws:s3:::b"),
            share("data", "arn:aws:s3:::b/data/"),
        ];
        let scope = ChangeSet {
            folders: ["data/x/".to_string(), "logs/".to_string()].into(),
            ..Default::default()
        };
        let plans = plan_refreshes(&shares, "b", &scope);
        assert_eq!(plans.len(), 2);
        assert_eq!(
            (
                plans[0].share_arn.as_str(),
                plans[0].folders.clone(),
                plans[0].recursive
            ),
            (
                "root",
                vec![
                    "/".to_string(),
                    "/data".into(),
                    "/data/x".into(),
                    "/logs".into()
                ],
                false
            )
        );
        assert_eq!(
            (plans[1].share_arn.as_str(), plans[1].folders.clone()),
            ("data", vec!["/".to_string(), "/x".into()])
        );
        let whole = plan_refreshes(&shares, "b", &ChangeSet::whole());
        assert!(whole.iter().all(|p| p.folders == ["/"] && p.recursive));
    }
}
