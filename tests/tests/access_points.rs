//! Shares on S3 access points (issue 10, part 3): a share's `LocationARN` may be an
//! access point ARN (`arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME[/prefix/]`) or an
//! access point alias used as a bucket name (`arn:aws:s3:::NAME-…-s3alias`). S3 events
//! name the bucket, so the refresher asks S3 Control which bucket each access point
//! belongs to.
//!
//! The access points are real ones in moto's S3 Control, reached by the real SDK client
//! through [`S3ControlForwarder`] (`http://localhost:PORT`; see there why: the SDK puts
//! the account in the host name, and moto names its answers' root element wrongly for
//! it). The first test pins down what the SDK sends; the second runs the product's
//! adapter against moto; the third runs the compiled binaries and counts, at a proxy,
//! the S3 Control calls that reached moto.

use integration_tests::aws::{
    s3control_client, sdk_config, unique_name, BoxError, Clients, ACCOUNT_ID, REGION,
};
use integration_tests::counting_proxy::CountingProxy;
use integration_tests::moto::Moto;
use integration_tests::s3control::S3ControlForwarder;
use integration_tests::sgw_standin::{BucketSource, RefreshRecord, ShareKind};
use integration_tests::stack::{Stack, StackOptions};
use shared::adapters::sdk::SdkAccessPoints;
use shared::ports::AccessPoints;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An access point name no other test uses (3 to 50 characters: lowercase, digits, '-').
fn access_point_name(prefix: &str) -> String {
    let mut name = unique_name(prefix).to_ascii_lowercase();
    name.truncate(50);
    name.trim_end_matches('-').to_string()
}

/// Creates access point `name` on `bucket` in moto; returns its ARN and alias.
async fn create_access_point(
    s3control: &aws_sdk_s3control::Client,
    name: &str,
    bucket: &str,
) -> Result<(String, String), BoxError> {
    let out = s3control
        .create_access_point()
        .account_id(ACCOUNT_ID)
        .name(name)
        .bucket(bucket)
        .send()
        .await?;
    let arn = out
        .access_point_arn()
        .ok_or("CreateAccessPoint returned no ARN")?
        .to_string();
    let alias = out
        .alias()
        .ok_or("CreateAccessPoint returned no alias")?
        .to_string();
    assert!(alias.ends_with("-s3alias"), "{alias}");
    Ok((arn, alias))
}

fn refreshes_of(stack: &Stack, share: &str) -> Vec<RefreshRecord> {
    stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == share)
        .collect()
}

fn sorted(list: &[String]) -> Vec<String> {
    let mut list = list.to_vec();
    list.sort();
    list
}

fn under(keys: &BTreeSet<String>, prefix: &str) -> BTreeSet<String> {
    keys.iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

/// What the SDK really sends: the account in the host name (so an endpoint of
/// `http://127.0.0.1:PORT` cannot work), `x-amz-account-id`, and a call signed for the
/// access point's region although the client's is another.
#[tokio::test]
async fn s3_control_for_access_points_puts_the_account_in_the_host_name() -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let adapter = SdkAccessPoints::new(s3control_client(&format!("http://localhost:{port}")).await);
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ErrorResponse><Error>\
            <Code>NoSuchAccessPoint</Code><Message>The specified accesspoint does not exist</Message>\
            </Error></ErrorResponse>";
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head).to_ascii_lowercase())
    });
    // The client is configured for us-east-1; the access point is in eu-west-1.
    let found = adapter
        .get_access_point(ACCOUNT_ID, "eu-west-1", "probe")
        .await?;
    assert_eq!(
        found, None,
        "NoSuchAccessPoint is no access point, not an error"
    );
    let head = tokio::time::timeout(Duration::from_secs(10), server).await???;
    assert!(
        head.starts_with("get /v20180820/accesspoint/probe http/1.1"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nhost: {ACCOUNT_ID}.localhost:{port}\r\n")),
        "the account goes into the host name: {head}"
    );
    assert!(
        head.contains(&format!("\r\nx-amz-account-id: {ACCOUNT_ID}\r\n")),
        "{head}"
    );
    assert!(
        head.contains("/eu-west-1/s3/aws4_request"),
        "signed for the access point's region: {head}"
    );
    Ok(())
}

/// The S3 Control adapter against moto: GetAccessPoint, a missing access point, and
/// ListAccessPoints through all of its pages.
#[tokio::test]
async fn sdk_access_points_adapter_gets_and_lists_in_moto() -> Result<(), BoxError> {
    let moto = Moto::start().await?;
    let proxy = CountingProxy::start(moto.endpoint()).await?;
    let counted = S3ControlForwarder::start(&proxy.endpoint()).await?;
    let direct = S3ControlForwarder::start(moto.endpoint()).await?;
    let clients = Clients::new(&sdk_config(moto.endpoint()).await);
    let s3control = s3control_client(&direct.endpoint()).await;
    let bucket = access_point_name("adapter-bucket");
    clients.s3.create_bucket().bucket(&bucket).send().await?;
    let mut created = BTreeSet::new();
    for i in 0..5 {
        let name = access_point_name(&format!("adapter-ap{i}"));
        let (_, alias) = create_access_point(&s3control, &name, &bucket).await?;
        created.insert((name, alias));
    }
    let adapter =
        SdkAccessPoints::new(s3control_client(&counted.endpoint()).await).with_page_size(2);

    let (name, alias) = created.iter().next().ok_or("no access point")?;
    let point = adapter
        .get_access_point(ACCOUNT_ID, REGION, name)
        .await?
        .ok_or("GetAccessPoint found nothing")?;
    assert_eq!(
        (&point.name, &point.alias, &point.bucket),
        (name, alias, &bucket)
    );
    let missing = access_point_name("adapter-missing");
    assert_eq!(
        adapter
            .get_access_point(ACCOUNT_ID, REGION, &missing)
            .await?,
        None
    );
    assert_eq!(proxy.count("GetAccessPoint"), 2);

    let listed = adapter.list_access_points(ACCOUNT_ID, REGION).await?;
    let ours: BTreeSet<(String, String)> = listed
        .iter()
        .filter(|p| p.bucket == bucket)
        .map(|p| (p.name.clone(), p.alias.clone()))
        .collect();
    assert_eq!(ours, created, "every page was read");
    // Other tests may have made access points in this moto too: all of them, two a page.
    let pages = proxy.count("ListAccessPoints");
    assert_eq!(
        pages as usize,
        listed.len().div_ceil(2).max(1),
        "{listed:?}"
    );
    assert!(pages >= 3);
    Ok(())
}

/// Through the compiled binaries: a share on an access point ARN (with a prefix), one
/// on the alias of the same access point, one on a decoy access point of another bucket,
/// and one on an access point that does not exist. Real S3 events from moto go to the
/// aggregator; the refresher refreshes both shares of the bucket, not the decoy, logs
/// and counts the missing one, and asks S3 Control once per access point.
#[tokio::test]
async fn shares_on_access_points_and_aliases_are_refreshed_and_a_decoy_is_not(
) -> Result<(), BoxError> {
    let moto = Moto::start().await?;
    // The refresher's S3 Control calls pass a counting proxy on their way to moto.
    let proxy = CountingProxy::start(moto.endpoint()).await?;
    let counted = S3ControlForwarder::start(&proxy.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            refresh_delay_seconds: 2,
            extra_env: vec![(
                "AWS_ENDPOINT_URL_S3_CONTROL".to_string(),
                counted.endpoint(),
            )],
            ..Default::default()
        },
    )
    .await?;
    let bucket = stack.create_bucket("ap-shares").await?;
    let test_event = stack.collect_s3_events(1).await?;
    assert_eq!(test_event[0]["Event"], "s3:TestEvent", "{test_event:?}");
    let decoy_bucket = access_point_name("ap-decoy-bucket");
    stack
        .clients
        .s3
        .create_bucket()
        .bucket(&decoy_bucket)
        .send()
        .await?;
    for key in ["data/old.txt", "top-old.txt"] {
        stack.clients.put_object(&bucket, key).await?;
    }
    stack
        .clients
        .put_object(&decoy_bucket, "data/decoy.txt")
        .await?;
    // The two objects' events are not the test's: consume them.
    stack.collect_s3_events(2).await?;

    // The test's own calls go to moto past the counting proxy.
    let s3control = s3control_client(&stack.s3control.endpoint()).await;
    let (ap_arn, alias) =
        create_access_point(&s3control, &access_point_name("ap-main"), &bucket).await?;
    let (decoy_arn, decoy_alias) =
        create_access_point(&s3control, &access_point_name("ap-decoy"), &decoy_bucket).await?;
    let missing_arn = format!(
        "arn:aws:s3:{REGION}:{ACCOUNT_ID}:accesspoint/{}",
        access_point_name("ap-missing")
    );
    // The stand-in's cache model needs to know the buckets, as a real gateway does.
    stack.gateway.add_access_point(&ap_arn, &alias, &bucket);
    stack
        .gateway
        .add_access_point(&decoy_arn, &decoy_alias, &decoy_bucket);

    let gw = stack.gateway.add_gateway("gw-access-points");
    let on_ap = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &format!("{ap_arn}/data/"));
    let on_alias = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &format!("arn:aws:s3:::{alias}"));
    let on_decoy = stack.gateway.add_share(&gw, ShareKind::Nfs, &decoy_arn);
    let on_missing = stack.gateway.add_share(&gw, ShareKind::Nfs, &missing_arn);
    for b in [&bucket, &decoy_bucket] {
        stack
            .gateway
            .set_bucket_source(b, BucketSource::S3(stack.clients.s3.clone()));
    }
    for share in [&on_ap, &on_alias, &on_decoy] {
        stack.gateway.prime_share_cache(share).await?;
    }
    let before = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(stack.gateway.share_view(&on_ap), under(&before, "data/"));
    assert_eq!(stack.gateway.share_view(&on_alias), before);

    for key in ["data/new/a.txt", "data/b.txt", "top.txt"] {
        stack.clients.put_object(&bucket, key).await?;
    }
    let after = stack.clients.list_keys(&bucket, "").await?;
    let feed = stack.feed_s3_events(3).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert!(run.errors.is_empty(), "{:?}", run.errors);

    // The access point share: folders relative to its root, the access point's prefix.
    let ap_calls = refreshes_of(&stack, &on_ap);
    assert_eq!(ap_calls.len(), 1, "{ap_calls:?}");
    assert_eq!(sorted(&ap_calls[0].folder_list), ["/", "/new"]);
    // The alias share sees the whole bucket.
    let alias_calls = refreshes_of(&stack, &on_alias);
    assert_eq!(alias_calls.len(), 1, "{alias_calls:?}");
    assert_eq!(
        sorted(&alias_calls[0].folder_list),
        ["/", "/data", "/data/new"]
    );
    for call in ap_calls.iter().chain(&alias_calls) {
        assert!(!call.recursive && call.listing_error.is_none(), "{call:?}");
    }
    assert!(
        refreshes_of(&stack, &on_decoy).is_empty(),
        "the decoy maps another bucket"
    );
    assert!(
        refreshes_of(&stack, &on_missing).is_empty(),
        "never guessed"
    );
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 2);
    assert_eq!(stack.gateway.share_view(&on_ap), under(&after, "data/"));
    assert_eq!(stack.gateway.share_view(&on_alias), after);

    // One GetAccessPoint per access point (the main one, the decoy, the missing one)
    // and one ListAccessPoints (one page) for the alias.
    assert_eq!(proxy.count("GetAccessPoint"), 3, "{:?}", proxy.counts());
    assert_eq!(proxy.count("ListAccessPoints"), 1, "{:?}", proxy.counts());
    // The missing access point is logged with its ARN, at WARN, and counted.
    let output = stack.refresher.output_lines();
    assert!(
        output
            .iter()
            .any(|l| l.contains("WARN") && l.contains(&missing_arn) && l.contains(&on_missing)),
        "{output:#?}"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("\"AccessPointsUnresolved\":1")),
        "{output:#?}"
    );

    // A warm container keeps the map: the next window asks S3 Control nothing.
    stack.clients.put_object(&bucket, "data/new/c.txt").await?;
    let feed = stack.feed_s3_events(1).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert_eq!(refreshes_of(&stack, &on_ap).len(), 2);
    assert_eq!(refreshes_of(&stack, &on_alias).len(), 2);
    assert!(refreshes_of(&stack, &on_decoy).is_empty());
    assert_eq!(
        (
            proxy.count("GetAccessPoint"),
            proxy.count("ListAccessPoints")
        ),
        (3, 1),
        "{:?}",
        proxy.counts()
    );
    assert!(stack.gateway.share_view(&on_ap).contains("data/new/c.txt"));
    Ok(())
}
