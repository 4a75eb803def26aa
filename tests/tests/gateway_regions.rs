//! Gateways in another region (`GATEWAY_REGIONS`), through the compiled binaries.
//!
//! A bucket has one share on a gateway in the function's own region (`us-east-1`, the
//! region of the test stack) and one on a gateway in a second region. The Storage
//! Gateway stand-in serves regions as AWS does: a request goes to the region of its
//! SigV4 credential scope, and only sees the gateways and shares of that region. What
//! reached the stand-in is counted per share and per region.

use integration_tests::aws::{BoxError, REGION};
use integration_tests::runtime_api::{LambdaProcess, LambdaSpawn};
use integration_tests::sgw_standin::{RecordedCall, ShareKind};
use integration_tests::stack::{binary, Stack, StackOptions};
use std::collections::BTreeSet;
use std::time::Duration;

/// The second region, where the far gateway lives.
const FAR: &str = "eu-west-2";

struct Setup {
    stack: Stack,
    bucket: String,
    home_share: String,
    far_share: String,
    /// A share of another bucket on the far gateway: never refreshed.
    far_decoy: String,
}

/// A stack whose functions get `gateway_regions` as `GATEWAY_REGIONS` (unset when
/// `None`), a bucket with a share in each region, and a decoy share in the far region.
async fn setup(gateway_regions: Option<&str>) -> Result<Setup, BoxError> {
    let extra_env = gateway_regions
        .map(|r| vec![("GATEWAY_REGIONS".to_string(), r.to_string())])
        .unwrap_or_default();
    let stack = Stack::start(StackOptions {
        extra_env,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("regions").await?;
    let other = stack.create_bucket("regions-other").await?;
    let home = stack.gateway.add_gateway("home");
    let far = stack.gateway.add_gateway_in(FAR, "far");
    assert!(home.contains(&format!(":{REGION}:")), "{home}");
    assert!(far.contains(&format!(":{FAR}:")), "{far}");
    let home_share =
        stack
            .gateway
            .add_share(&home, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
    let far_share =
        stack
            .gateway
            .add_share(&far, ShareKind::Smb, &format!("arn:aws:s3:::{bucket}"));
    let far_decoy = stack
        .gateway
        .add_share(&far, ShareKind::Nfs, &format!("arn:aws:s3:::{other}"));
    assert!(far_share.contains(&format!(":{FAR}:")), "{far_share}");
    Ok(Setup {
        stack,
        bucket,
        home_share,
        far_share,
        far_decoy,
    })
}

/// One object event for the bucket, through the aggregator and the refresher.
async fn one_change(setup: &Setup) -> Result<(), BoxError> {
    let stack = &setup.stack;
    // The s3:TestEvent of the bucket's notification set-up comes first.
    stack
        .clients
        .put_object(&setup.bucket, "reports/2026/q1.csv")
        .await?;
    let events = stack.collect_s3_events(2).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    Ok(())
}

/// Accepted `RefreshCache` calls on `share`, as the stand-in recorded them.
fn refreshes_of(stack: &Stack, share: &str) -> Vec<RecordedCall> {
    stack
        .gateway
        .calls()
        .into_iter()
        .filter(|c| {
            c.operation == "RefreshCache" && c.body["FileShareARN"] == share && c.status == 200
        })
        .collect()
}

/// The regions that requests of `operation` went to.
fn regions_of(stack: &Stack, operation: &str) -> BTreeSet<String> {
    stack
        .gateway
        .calls()
        .into_iter()
        .filter(|c| c.operation == operation)
        .map(|c| c.region)
        .collect()
}

#[tokio::test]
async fn a_share_on_a_gateway_in_a_second_region_is_refreshed() -> Result<(), BoxError> {
    let setup = setup(Some(&format!("{REGION}, {FAR}"))).await?;
    one_change(&setup).await?;
    let stack = &setup.stack;

    let home = refreshes_of(stack, &setup.home_share);
    let far = refreshes_of(stack, &setup.far_share);
    assert_eq!(
        (home.len(), far.len()),
        (1, 1),
        "{:#?}",
        stack.gateway.calls()
    );
    // Each went to its share's region.
    assert_eq!(home[0].region, REGION);
    assert_eq!(far[0].region, FAR);
    assert!(refreshes_of(stack, &setup.far_decoy).is_empty());
    // Listed and described in both regions; nothing failed at the stand-in.
    let both: BTreeSet<String> = [REGION, FAR].iter().map(|r| r.to_string()).collect();
    assert_eq!(regions_of(stack, "ListFileShares"), both);
    let described: BTreeSet<String> = regions_of(stack, "DescribeNFSFileShares")
        .into_iter()
        .chain(regions_of(stack, "DescribeSMBFileShares"))
        .collect();
    assert_eq!(described, both);
    let failed: Vec<RecordedCall> = stack
        .gateway
        .calls()
        .into_iter()
        .filter(|c| c.status != 200)
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    Ok(())
}

/// The old behaviour, and still the default: the refresher asks its own region only,
/// so a share on a gateway in another region is never refreshed.
#[tokio::test]
async fn without_gateway_regions_only_the_own_region_is_refreshed() -> Result<(), BoxError> {
    let setup = setup(None).await?;
    one_change(&setup).await?;
    let stack = &setup.stack;
    assert_eq!(refreshes_of(stack, &setup.home_share).len(), 1);
    assert!(refreshes_of(stack, &setup.far_share).is_empty());
    let calls = stack.gateway.calls();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|c| c.region == REGION),
        "every call goes to {REGION}: {calls:#?}"
    );
    Ok(())
}

/// `GATEWAY_REGIONS` replaces the default: naming only the far region leaves the own
/// region's gateways alone.
#[tokio::test]
async fn gateway_regions_without_the_own_region_asks_only_the_named_one() -> Result<(), BoxError> {
    let setup = setup(Some(FAR)).await?;
    one_change(&setup).await?;
    let stack = &setup.stack;
    assert!(refreshes_of(stack, &setup.home_share).is_empty());
    assert_eq!(refreshes_of(stack, &setup.far_share).len(), 1);
    let calls = stack.gateway.calls();
    assert!(
        calls.iter().all(|c| c.region == FAR),
        "every call goes to {FAR}: {calls:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_malformed_gateway_regions_stops_the_refresher_at_init() -> Result<(), BoxError> {
    let path = binary("refresher")?;
    for bad in [
        "",
        "us-east-1,",
        "us-east-1,,eu-west-2",
        "us-east-1,us-east-1",
        "US-EAST-1",
        "us-east",
        "eu-west-2 us-east-1",
        "arn:aws:storagegateway:eu-west-2",
    ] {
        let spec = LambdaSpawn::new(&path, "S3EventAggregatorRefresher")
            .env("AWS_REGION", REGION)
            .env("GATEWAY_REGIONS", bad);
        let process = LambdaProcess::spawn(spec).await?;
        let outcome = process.wait_for_init_error(Duration::from_secs(10)).await?;
        assert!(outcome.failed(), "{bad:?} must stop the refresher at init");
        let lines: Vec<&String> = outcome
            .output
            .iter()
            .filter(|l| l.contains("GATEWAY_REGIONS"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{bad:?}: one line names GATEWAY_REGIONS: {:?}",
            outcome.output
        );
        assert!(
            lines[0].contains(&format!("{bad:?}"))
                && lines[0].contains("region names such as us-east-1,eu-west-2"),
            "{bad:?}: {}",
            lines[0]
        );
    }
    Ok(())
}
