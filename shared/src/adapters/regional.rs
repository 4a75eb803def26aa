//! Storage Gateway in several regions behind one [`FileGateway`].
//!
//! A gateway in one region can serve a bucket in another, and Storage Gateway's API is
//! regional: `ListFileShares` in region R names only the shares of R's gateways, and a
//! share's ARN (`arn:aws:storagegateway:R:ACCOUNT:share/share-XXXXXXXX`) is only known
//! in R. [`RegionalGateways`] holds one gateway per configured region (`GATEWAY_REGIONS`)
//! and:
//!
//! * pages `ListFileShares` through every region in turn. The marker it hands out is
//!   `INDEX:MARKER`: the position of the region in the list and that region's own
//!   marker (empty for "the first page of this region"). A marker it did not make is an
//!   error, never a silent restart from the first region;
//! * sends `Describe{NFS,SMB}FileShares` and `RefreshCache` to the region that the
//!   share ARN names, splitting a describe batch by region (at most
//!   [`DESCRIBE_BATCH`] ARNs per call). An ARN of a region that is not configured is
//!   an error that retrying cannot fix ([`Retry::Never`]).
//!
//! Generic over the gateway and free of SDK types, so that unit tests and the
//! simulation use it with [`super::memory::MemoryGateway`].

use crate::error::{GatewayError, Retry};
use crate::ports::{DescribedShare, FileGateway, SharePage, DESCRIBE_BATCH};
use crate::shares::{RefreshPlan, ShareKind};

/// One [`FileGateway`] per region.
#[derive(Debug)]
pub struct RegionalGateways<G> {
    regions: Vec<(String, G)>,
}

/// The region of a Storage Gateway ARN (`arn:PARTITION:storagegateway:REGION:ACCOUNT:...`).
pub fn region_of_arn(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("storagegateway"), Some(region), Some(_), Some(_)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    (!partition.is_empty() && !region.is_empty()).then_some(region)
}

/// Says which region a failure came from, so that the log line names it.
fn in_region(error: GatewayError, region: &str) -> GatewayError {
    match error {
        GatewayError::ShareNotFound { share_arn, message } => GatewayError::ShareNotFound {
            share_arn,
            message: format!("{region}: {message}"),
        },
        GatewayError::Busy { message } => GatewayError::Busy {
            message: format!("{region}: {message}"),
        },
        GatewayError::Other { retry, message } => GatewayError::Other {
            retry,
            message: format!("{region}: {message}"),
        },
    }
}

impl<G> RegionalGateways<G> {
    /// `(region, gateway)` pairs, listed in this order. A region named twice keeps its
    /// first gateway.
    pub fn new(regions: impl IntoIterator<Item = (String, G)>) -> Self {
        let mut kept: Vec<(String, G)> = Vec::new();
        for (region, gateway) in regions {
            if !kept.iter().any(|(r, _)| *r == region) {
                kept.push((region, gateway));
            }
        }
        RegionalGateways { regions: kept }
    }

    /// The regions, in listing order.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.regions.iter().map(|(r, _)| r.as_str())
    }

    /// The gateway of `region`, if it is configured.
    pub fn gateway(&self, region: &str) -> Option<&G> {
        self.regions
            .iter()
            .find(|(r, _)| r == region)
            .map(|(_, g)| g)
    }

    /// The gateway that serves `arn`, by the region the ARN names.
    fn for_arn(&self, arn: &str) -> Result<(&str, &G), GatewayError> {
        let region = region_of_arn(arn).ok_or_else(|| GatewayError::Other {
            retry: Retry::Never,
            message: format!("{arn:?} is not a Storage Gateway ARN; its region is unknown"),
        })?;
        self.regions
            .iter()
            .find(|(r, _)| r == region)
            .map(|(r, g)| (r.as_str(), g))
            .ok_or_else(|| GatewayError::Other {
                retry: Retry::Never,
                message: format!(
                    "{arn} is in region {region}, which GATEWAY_REGIONS does not name (configured: {})",
                    self.regions().collect::<Vec<_>>().join(",")
                ),
            })
    }

    /// `(region index, that region's marker)` of one of our markers.
    fn decode_marker<'m>(&self, marker: &'m str) -> Result<(usize, Option<&'m str>), GatewayError> {
        let bad = |why: &str| GatewayError::Other {
            retry: Retry::Never,
            message: format!("ListFileShares marker {marker:?} is not one of ours: {why}"),
        };
        let (index, inner) = marker
            .split_once(':')
            .ok_or_else(|| bad("no region index"))?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("no region index"));
        }
        let index: usize = index.parse().map_err(|_| bad("no region index"))?;
        if index >= self.regions.len() {
            return Err(bad("no such region"));
        }
        // The first region's first page has no marker; "0:" is never handed out.
        if index == 0 && inner.is_empty() {
            return Err(bad("the first page has no marker"));
        }
        Ok((index, (!inner.is_empty()).then_some(inner)))
    }
}

fn encode_marker(index: usize, inner: &str) -> String {
    format!("{index}:{inner}")
}

impl<G: FileGateway> FileGateway for RegionalGateways<G> {
    async fn list_file_shares(&self, marker: Option<&str>) -> Result<SharePage, GatewayError> {
        let (index, inner) = match marker {
            None => (0, None),
            Some(m) => self.decode_marker(m)?,
        };
        let Some((region, gateway)) = self.regions.get(index) else {
            // No region at all: nothing to list.
            return Ok(SharePage::default());
        };
        let page = gateway
            .list_file_shares(inner)
            .await
            .map_err(|e| in_region(e, region))?;
        let next_marker = match page.next_marker {
            Some(next) if !next.is_empty() => Some(encode_marker(index, &next)),
            _ => (index + 1 < self.regions.len()).then(|| encode_marker(index + 1, "")),
        };
        Ok(SharePage {
            shares: page.shares,
            next_marker,
        })
    }

    async fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> Result<Vec<DescribedShare>, GatewayError> {
        // Each configured region's ARNs in the order given, then batches of at most 10.
        let mut by_region: Vec<(&str, &G, Vec<String>)> = Vec::new();
        for arn in arns {
            let (region, gateway) = self.for_arn(arn)?;
            match by_region.iter_mut().find(|(r, _, _)| *r == region) {
                Some((_, _, list)) => list.push(arn.clone()),
                None => by_region.push((region, gateway, vec![arn.clone()])),
            }
        }
        let mut described = Vec::with_capacity(arns.len());
        for (region, gateway, list) in by_region {
            for chunk in list.chunks(DESCRIBE_BATCH) {
                described.extend(
                    gateway
                        .describe_file_shares(kind, chunk)
                        .await
                        .map_err(|e| in_region(e, region))?,
                );
            }
        }
        Ok(described)
    }

    async fn refresh_cache(&self, plan: &RefreshPlan) -> Result<String, GatewayError> {
        let (region, gateway) = self.for_arn(&plan.share_arn)?;
        gateway
            .refresh_cache(plan)
            .await
            .map_err(|e| in_region(e, region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryGateway, MemoryQueue, MemoryWindowStore};
    use crate::clock::SystemClock;
    use crate::refresher::Refresher;
    use serde_json::json;

    const US: &str = "us-east-1";
    const EU: &str = "eu-west-1";
    const AP: &str = "ap-southeast-2";

    fn share_arn(region: &str, n: usize) -> String {
        format!("arn:aws:storagegateway:{region}:123456789012:share/share-{n:08X}")
    }

    fn gateways(regions: &[(&str, usize)]) -> RegionalGateways<MemoryGateway> {
        RegionalGateways::new(
            regions
                .iter()
                .map(|(r, page)| (r.to_string(), MemoryGateway::new(*page))),
        )
    }

    fn gw<'a>(g: &'a RegionalGateways<MemoryGateway>, region: &str) -> &'a MemoryGateway {
        g.gateway(region).expect("configured in the test")
    }

    async fn list_all(g: &RegionalGateways<MemoryGateway>) -> (Vec<String>, Vec<String>) {
        let mut arns = Vec::new();
        let mut markers = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = g.list_file_shares(marker.as_deref()).await.unwrap();
            arns.extend(page.shares.into_iter().map(|s| s.arn));
            match page.next_marker {
                Some(next) => {
                    markers.push(next.clone());
                    marker = Some(next);
                }
                None => return (arns, markers),
            }
        }
    }

    fn plan(arn: &str) -> RefreshPlan {
        RefreshPlan {
            share_arn: arn.to_string(),
            folders: vec!["/".to_string()],
            recursive: true,
        }
    }

    #[test]
    fn region_is_read_from_the_arn() {
        assert_eq!(region_of_arn(&share_arn(EU, 1)), Some(EU));
        assert_eq!(
            region_of_arn("arn:aws-us-gov:storagegateway:us-gov-west-1:1:share/share-1"),
            Some("us-gov-west-1")
        );
        assert_eq!(
            region_of_arn("arn:aws-cn:storagegateway:cn-north-1:1:gateway/sgw-1"),
            Some("cn-north-1")
        );
        for bad in [
            "",
            "share-1",
            "arn:aws:s3:::bucket",
            "arn:aws:storagegateway::1:share/share-1",
            "arn:aws:storagegateway:us-east-1",
            "arn::storagegateway:us-east-1:1:share/x",
        ] {
            assert_eq!(region_of_arn(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn lists_every_region_in_turn_with_its_own_markers() {
        let g = gateways(&[(US, 50), (EU, 50), (AP, 50)]);
        for i in 0..120 {
            gw(&g, US).add_share(&share_arn(US, i), ShareKind::Nfs, "arn:aws:s3:::b");
        }
        // EU has no share at all; AP has a few.
        for i in 0..30 {
            gw(&g, AP).add_share(&share_arn(AP, i), ShareKind::Smb, "arn:aws:s3:::b");
        }
        let (arns, markers) = list_all(&g).await;
        let expected: Vec<String> = (0..120)
            .map(|i| share_arn(US, i))
            .chain((0..30).map(|i| share_arn(AP, i)))
            .collect();
        assert_eq!(arns, expected);
        assert_eq!(markers, ["0:50", "0:100", "1:", "2:"]);
        assert_eq!(
            (
                gw(&g, US).list_calls(),
                gw(&g, EU).list_calls(),
                gw(&g, AP).list_calls()
            ),
            (3, 1, 1)
        );
    }

    #[tokio::test]
    async fn the_same_inner_marker_in_two_regions_stays_apart() {
        let g = gateways(&[(US, 2), (EU, 2)]);
        for region in [US, EU] {
            for i in 0..5 {
                gw(&g, region).add_share(&share_arn(region, i), ShareKind::Nfs, "arn:aws:s3:::b");
            }
        }
        let (arns, markers) = list_all(&g).await;
        assert_eq!(arns.len(), 10);
        assert_eq!(markers, ["0:2", "0:4", "1:", "1:2", "1:4"]);
    }

    #[tokio::test]
    async fn one_region_lists_as_its_gateway_does() {
        let g = gateways(&[(US, 50)]);
        for i in 0..60 {
            gw(&g, US).add_share(&share_arn(US, i), ShareKind::Nfs, "arn:aws:s3:::b");
        }
        let (arns, markers) = list_all(&g).await;
        assert_eq!(arns.len(), 60);
        assert_eq!(markers, ["0:50"]);
        assert_eq!(gw(&g, US).list_calls(), 2);
    }

    #[tokio::test]
    async fn a_marker_that_is_not_ours_is_an_error_not_a_restart() {
        let g = gateways(&[(US, 1), (EU, 1)]);
        gw(&g, US).add_share(&share_arn(US, 1), ShareKind::Nfs, "arn:aws:s3:::b");
        gw(&g, US).add_share(&share_arn(US, 2), ShareKind::Nfs, "arn:aws:s3:::b");
        for bad in [
            "garbage", "50", "", ":1", "x:1", "-1:", "2:", "9:1", "0:", "+1:",
        ] {
            let err = g.list_file_shares(Some(bad)).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    GatewayError::Other {
                        retry: Retry::Never,
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        // A well-formed marker whose inner part the region's gateway refuses.
        let err = g.list_file_shares(Some("0:nope")).await.unwrap_err();
        assert!(err.to_string().contains(US), "{err}");
        assert_eq!(gw(&g, US).list_calls(), 1);
        assert_eq!(gw(&g, EU).list_calls(), 0);
    }

    #[tokio::test]
    async fn describes_split_by_region_at_most_ten_per_call() {
        let g = gateways(&[(US, 100), (EU, 100)]);
        let mut arns = Vec::new();
        for i in 0..15 {
            let region = if i % 5 == 4 { EU } else { US };
            let arn = share_arn(region, i);
            gw(&g, region).add_share(&arn, ShareKind::Nfs, "arn:aws:s3:::b");
            arns.push(arn);
        }
        // 12 in US (10 + 2) and 3 in EU: three calls, none over ten, none mixed
        // (a MemoryGateway fails an ARN it does not hold, and more than ten).
        let described = g.describe_file_shares(ShareKind::Nfs, &arns).await.unwrap();
        let mut got: Vec<String> = described.into_iter().map(|d| d.arn).collect();
        got.sort();
        let mut want = arns.clone();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            (gw(&g, US).describe_calls(), gw(&g, EU).describe_calls()),
            (2, 1)
        );
    }

    #[tokio::test]
    async fn describe_of_an_unconfigured_region_is_never_retried() {
        let g = gateways(&[(US, 100)]);
        gw(&g, US).add_share(&share_arn(US, 1), ShareKind::Nfs, "arn:aws:s3:::b");
        let arns = [share_arn(US, 1), share_arn(EU, 2)];
        let err = g
            .describe_file_shares(ShareKind::Nfs, &arns)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                GatewayError::Other {
                    retry: Retry::Never,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(EU), "{err}");
        assert_eq!(
            gw(&g, US).describe_calls(),
            0,
            "nothing sent for a bad batch"
        );
    }

    #[tokio::test]
    async fn refresh_goes_to_the_share_region() {
        let g = gateways(&[(US, 100), (EU, 100)]);
        let (us, eu) = (share_arn(US, 1), share_arn(EU, 2));
        gw(&g, US).add_share(&us, ShareKind::Nfs, "arn:aws:s3:::b");
        gw(&g, EU).add_share(&eu, ShareKind::Smb, "arn:aws:s3:::b");
        g.refresh_cache(&plan(&eu)).await.unwrap();
        g.refresh_cache(&plan(&us)).await.unwrap();
        g.refresh_cache(&plan(&eu)).await.unwrap();
        assert_eq!(gw(&g, US).refreshes(), [plan(&us)]);
        assert_eq!(gw(&g, EU).refreshes(), [plan(&eu), plan(&eu)]);

        for bad in [share_arn(AP, 3), "share-1".to_string()] {
            let err = g.refresh_cache(&plan(&bad)).await.unwrap_err();
            assert_eq!(err.retry(), Retry::Never, "{bad}: {err}");
        }
        // A share that is gone in its region is still "gone" (the cache is dropped).
        gw(&g, EU).remove_share(&eu);
        let err = g.refresh_cache(&plan(&eu)).await.unwrap_err();
        assert!(
            matches!(&err, GatewayError::ShareNotFound { share_arn, .. } if *share_arn == eu),
            "{err}"
        );
    }

    fn sqs_message(id: &str, bucket: &str) -> serde_json::Value {
        json!({"messageId": id, "body": "{}",
               "messageAttributes": {"bucket-name": {"stringValue": bucket, "dataType": "String"}}})
    }

    #[tokio::test]
    async fn the_refresher_refreshes_the_bucket_shares_in_every_region() {
        let g = gateways(&[(US, 3), (EU, 3)]);
        let (us, eu) = (share_arn(US, 1), share_arn(EU, 2));
        // Decoys in both regions, so that the listing pages within each region.
        for i in 10..17 {
            gw(&g, US).add_share(&share_arn(US, i), ShareKind::Smb, "arn:aws:s3:::other");
            gw(&g, EU).add_share(&share_arn(EU, i), ShareKind::Nfs, "arn:aws:s3:::other");
        }
        gw(&g, US).add_share(&us, ShareKind::Nfs, "arn:aws:s3:::b1");
        gw(&g, EU).add_share(&eu, ShareKind::Smb, "arn:aws:s3:::b1/data/");
        let r = Refresher::new(
            MemoryWindowStore::default(),
            g,
            MemoryQueue::default(),
            SystemClock,
        );
        let out = r
            .handle(&json!({"Records": [sqs_message("m1", "b1")]}))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty(), "{out:?}");
        let refreshed = |region| -> Vec<String> {
            gw(r.gateway(), region)
                .refreshes()
                .into_iter()
                .map(|p| p.share_arn)
                .collect()
        };
        assert_eq!(refreshed(US), [us]);
        assert_eq!(refreshed(EU), [eu]);
        assert_eq!(
            (
                gw(r.gateway(), US).list_calls(),
                gw(r.gateway(), EU).list_calls()
            ),
            (3, 3)
        );
    }

    #[tokio::test]
    async fn a_listed_share_of_an_unconfigured_region_fails_the_message() {
        // A gateway that lists a share under another region's ARN cannot be asked about
        // it: the message fails (to its DLQ in the end) and nothing is refreshed in part.
        let g = gateways(&[(US, 100), (EU, 100)]);
        gw(&g, US).add_share(&share_arn(US, 1), ShareKind::Nfs, "arn:aws:s3:::b1");
        gw(&g, EU).add_share(&share_arn(AP, 9), ShareKind::Nfs, "arn:aws:s3:::b1");
        let r = Refresher::new(
            MemoryWindowStore::default(),
            g,
            MemoryQueue::default(),
            SystemClock,
        );
        let out = r
            .handle(&json!({"Records": [sqs_message("m1", "b1")]}))
            .await
            .unwrap();
        assert_eq!(out.batch_item_failures.len(), 1, "{out:?}");
        assert!(gw(r.gateway(), US).refreshes().is_empty());
    }
}
