//! An in-memory S3 bucket: just the set of object keys, shared between the test or
//! benchmark that writes it and the Storage Gateway stand-in that lists it.
//!
//! It lets the stand-in model a large bucket (100,000 objects) without uploading
//! anything to moto. Listings follow `ListObjectsV2`: keys in UTF-8 byte order, with or
//! without the delimiter `/`, and the number of requests that S3 would need at 1000
//! entries (keys plus common prefixes) per page.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

/// `ListObjectsV2`'s largest page: at most 1000 keys plus common prefixes.
pub const LIST_PAGE_SIZE: usize = 1000;

/// The result of listing a prefix, all pages together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectListing {
    /// Full object keys, in key order.
    pub objects: Vec<String>,
    /// Full common prefixes (ending in `/`), in key order; empty without a delimiter.
    pub prefixes: Vec<String>,
    /// `ListObjectsV2` requests made (or that S3 would need): at least one.
    pub requests: u64,
}

impl ObjectListing {
    /// A listing of `objects` and `prefixes` with the request count S3 would need.
    pub fn paged(objects: Vec<String>, prefixes: Vec<String>) -> ObjectListing {
        let entries = objects.len() + prefixes.len();
        // An empty result still costs one request.
        let requests = entries.div_ceil(LIST_PAGE_SIZE).max(1) as u64;
        ObjectListing {
            objects,
            prefixes,
            requests,
        }
    }
}

/// A cheaply cloneable handle to one bucket's object keys; clones share the keys.
#[derive(Clone, Debug, Default)]
pub struct BucketModel {
    keys: Arc<Mutex<BTreeSet<String>>>,
}

impl BucketModel {
    /// An empty bucket.
    pub fn new() -> BucketModel {
        BucketModel::default()
    }

    /// A bucket of `objects` objects spread round-robin over `folders` top-level
    /// folders: object `i` is [`BucketModel::object_key`]`(i % folders, i)`. With 0
    /// folders every object is at the root (`obj0000042`).
    pub fn with_objects(objects: usize, folders: usize) -> BucketModel {
        let keys = (0..objects)
            .map(|i| match folders {
                0 => format!("obj{i:07}"),
                f => BucketModel::object_key(i % f, i),
            })
            .collect();
        BucketModel {
            keys: Arc::new(Mutex::new(keys)),
        }
    }

    /// The name of folder `folder` in [`BucketModel::with_objects`] (`dir00002`).
    pub fn folder_name(folder: usize) -> String {
        format!("dir{folder:05}")
    }

    /// The key of object `i` in folder `folder` (`dir00002/obj0000042`).
    pub fn object_key(folder: usize, i: usize) -> String {
        format!("{}/obj{i:07}", BucketModel::folder_name(folder))
    }

    fn keys(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // A panicking test thread must not poison the bucket for the stand-in.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `key`; `true` if it was not there before (an overwrite is a no-op here:
    /// only keys are modelled).
    pub fn put(&self, key: impl Into<String>) -> bool {
        self.keys().insert(key.into())
    }

    /// Deletes `key`; `true` if it was there.
    pub fn delete(&self, key: &str) -> bool {
        self.keys().remove(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys().contains(key)
    }

    pub fn len(&self) -> usize {
        self.keys().len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }

    /// A copy of every key.
    pub fn snapshot(&self) -> BTreeSet<String> {
        self.keys().clone()
    }

    /// A copy of the keys that start with `prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> BTreeSet<String> {
        self.keys()
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// `ListObjectsV2` of `prefix`: with `delimited`, the keys directly under it and
    /// its common prefixes (Delimiter `/`); otherwise every key under it.
    pub fn list(&self, prefix: &str, delimited: bool) -> ObjectListing {
        let keys = self.keys();
        if !delimited {
            let objects = keys
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            return ObjectListing::paged(objects, Vec::new());
        }
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut from = prefix.to_string();
        let mut inclusive = true;
        loop {
            let lower = if inclusive {
                Bound::Included(from.as_str())
            } else {
                Bound::Excluded(from.as_str())
            };
            let Some(key) = keys.range::<str, _>((lower, Bound::Unbounded)).next() else {
                break;
            };
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            match rest.find('/') {
                None => {
                    objects.push(key.clone());
                    from = key.clone();
                    inclusive = false;
                }
                Some(slash) => {
                    let common = &key[..prefix.len() + slash + 1];
                    prefixes.push(common.to_string());
                    // Skip the whole common prefix: replacing its final '/' (0x2F) by
                    // '0' (0x30) gives the least string above every key under it, so a
                    // folder costs one lookup, not one step per key inside it.
                    from = format!("{}0", &common[..common.len() - 1]);
                    inclusive = true;
                }
            }
        }
        ObjectListing::paged(objects, prefixes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What S3 returns, computed the slow way.
    fn naive(keys: &BTreeSet<String>, prefix: &str) -> (Vec<String>, Vec<String>) {
        let mut objects = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with(prefix)) {
            let rest = &key[prefix.len()..];
            match rest.find('/') {
                None => objects.push(key.clone()),
                Some(i) => {
                    let common = key[..prefix.len() + i + 1].to_string();
                    if prefixes.last() != Some(&common) {
                        prefixes.push(common);
                    }
                }
            }
        }
        (objects, prefixes)
    }

    #[test]
    fn with_objects_spreads_over_folders() {
        let m = BucketModel::with_objects(30, 3);
        assert_eq!(m.len(), 30);
        for f in 0..3 {
            let prefix = format!("{}/", BucketModel::folder_name(f));
            assert_eq!(m.keys_with_prefix(&prefix).len(), 10);
        }
        assert!(m.contains("dir00001/obj0000004"));
        let root = BucketModel::with_objects(5, 0);
        assert!(root.contains("obj0000004"));
        assert!(BucketModel::new().is_empty());
    }

    #[test]
    fn delimited_listing_matches_s3_semantics() {
        let m = BucketModel::new();
        for k in [
            "a.txt", "a/1", "a/b/2", "a/b/3", "a/c/4", "a-b/5", "a0/6", "a//7", "a/", "b/8", "é/9",
            "z",
        ] {
            m.put(k);
        }
        let all = m.snapshot();
        for prefix in ["", "a/", "a/b/", "a", "x/", "a//", "é/"] {
            let listing = m.list(prefix, true);
            let (objects, prefixes) = naive(&all, prefix);
            assert_eq!(listing.objects, objects, "objects of {prefix:?}");
            assert_eq!(listing.prefixes, prefixes, "prefixes of {prefix:?}");
            assert_eq!(listing.requests, 1);
        }
        assert_eq!(
            m.list("a/", true).prefixes,
            vec!["a//".to_string(), "a/b/".to_string(), "a/c/".to_string()]
        );
        assert_eq!(
            m.list("a/", true).objects,
            vec!["a/".to_string(), "a/1".to_string()]
        );
        assert_eq!(m.list("a/b/", false).objects, vec!["a/b/2", "a/b/3"]);
    }

    #[test]
    fn requests_are_pages_of_1000_entries() {
        let m = BucketModel::with_objects(2500, 5);
        let all = m.list("", false);
        assert_eq!((all.objects.len(), all.requests), (2500, 3));
        let root = m.list("", true);
        assert_eq!((root.objects.len(), root.prefixes.len()), (0, 5));
        assert_eq!(root.requests, 1);
        assert_eq!(m.list("dir00000/", true).objects.len(), 500);
        assert_eq!(m.list("nope/", true), ObjectListing::paged(vec![], vec![]));
        assert_eq!(m.list("nope/", true).requests, 1);
        assert_eq!(
            ObjectListing::paged(vec!["k".into(); 1000], vec![]).requests,
            1
        );
        assert_eq!(
            ObjectListing::paged(vec!["k".into(); 1000], vec!["p/".into()]).requests,
            2
        );
    }

    #[test]
    fn put_and_delete_report_changes() {
        let m = BucketModel::new();
        let other = m.clone();
        assert!(m.put("k"));
        assert!(!other.put("k"));
        assert_eq!(other.len(), 1);
        assert!(other.delete("k"));
        assert!(!m.delete("k"));
        assert!(m.is_empty());
    }
}
