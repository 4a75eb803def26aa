//! The Storage Gateway stand-in, exercised through the real `aws-sdk-storagegateway`
//! client (and, for protocol edge cases, through raw HTTP).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_storagegateway::config::Credentials;
use aws_sdk_storagegateway::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_storagegateway::operation::describe_nfs_file_shares::DescribeNFSFileSharesError;
use aws_sdk_storagegateway::operation::list_file_shares::ListFileSharesError;
use aws_sdk_storagegateway::operation::refresh_cache::RefreshCacheError;
use aws_sdk_storagegateway::types::{FileShareType, StorageGatewayError};
use aws_sdk_storagegateway::Client;
use integration_tests::aws::{sdk_config, unique_name, Clients};
use integration_tests::moto::Moto;
use integration_tests::sgw_standin::{
    eventbridge_call, rfc3339_millis, BucketModel, BucketSource, CompletionEvent, CompletionEvents,
    InjectedFailure, ListingWork, RefreshRecord, SgwStandIn, ShareKind, ACCOUNT_ID,
    REFRESH_EVENT_DETAIL_TYPE, REFRESH_EVENT_SOURCE,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn client_with(standin: &SgwStandIn, retry: Option<RetryConfig>) -> Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(standin.endpoint());
    if let Some(retry) = retry {
        loader = loader.retry_config(retry);
    }
    Client::new(&loader.load().await)
}

/// A client with the SDK's default retry policy (3 attempts).
async fn client(standin: &SgwStandIn) -> Client {
    client_with(standin, None).await
}

/// A client that never retries, so each SDK call is exactly one request.
async fn client_no_retry(standin: &SgwStandIn) -> Client {
    client_with(standin, Some(RetryConfig::disabled())).await
}

fn error_code(e: Option<&StorageGatewayError>) -> Option<String> {
    e.and_then(|e| e.error_code())
        .map(|c| c.as_str().to_string())
}

async fn standin() -> SgwStandIn {
    SgwStandIn::start().await.expect("stand-in starts")
}

/// The HTTP status of the response behind an SDK error.
trait RawStatus {
    fn status_code(&self) -> Option<u16>;
}
impl<E> RawStatus for SdkError<E> {
    fn status_code(&self) -> Option<u16> {
        self.raw_response().map(|r| r.status().as_u16())
    }
}

#[tokio::test]
async fn lists_130_shares_in_pages_of_100() {
    let sgw = standin().await;
    let gw1 = sgw.add_gateway("one");
    let gw2 = sgw.add_gateway("two");
    let mut all = HashSet::new();
    for i in 0..130 {
        let gw = if i % 2 == 0 { &gw1 } else { &gw2 };
        let kind = if i % 3 == 0 {
            ShareKind::Smb
        } else {
            ShareKind::Nfs
        };
        all.insert(sgw.add_share(gw, kind, &format!("arn:aws:s3:::bucket-{i}")));
    }
    let sg = client(&sgw).await;

    let first = sg.list_file_shares().send().await.expect("page 1");
    assert_eq!(first.file_share_info_list().len(), 100);
    assert!(first.marker().is_none());
    let next = first.next_marker().expect("a next marker").to_string();

    let second = sg
        .list_file_shares()
        .marker(&next)
        .send()
        .await
        .expect("page 2");
    assert_eq!(second.file_share_info_list().len(), 30);
    assert_eq!(second.marker(), Some(next.as_str()));
    assert!(second.next_marker().is_none());

    let mut seen = HashSet::new();
    for info in first
        .file_share_info_list()
        .iter()
        .chain(second.file_share_info_list())
    {
        let arn = info.file_share_arn().expect("arn").to_string();
        assert!(seen.insert(arn), "no share listed twice");
        assert!(info
            .file_share_id()
            .is_some_and(|id| id.starts_with("share-")));
        assert!(matches!(
            info.file_share_type(),
            Some(FileShareType::Nfs) | Some(FileShareType::Smb)
        ));
        assert_eq!(info.file_share_status(), Some("AVAILABLE"));
        assert!(
            info.gateway_arn() == Some(gw1.as_str()) || info.gateway_arn() == Some(gw2.as_str())
        );
    }
    assert_eq!(seen, all);
    assert_eq!(sgw.calls_to("ListFileShares"), 2);

    // The SDK paginator follows the markers to the end.
    let items: Vec<_> = sg
        .list_file_shares()
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .expect("paginate");
    assert_eq!(items.len(), 130);
    assert_eq!(sgw.calls_to("ListFileShares"), 4);
}

#[tokio::test]
async fn list_honours_limit_gateway_filter_and_max_page_size() {
    let sgw = standin().await;
    let gw1 = sgw.add_gateway("one");
    let gw2 = sgw.add_gateway("two");
    for i in 0..130 {
        let gw = if i < 70 { &gw1 } else { &gw2 };
        sgw.add_share(gw, ShareKind::Nfs, &format!("arn:aws:s3:::b{i}"));
    }
    let sg = client(&sgw).await;

    // Limit 50: pages of 50, 50, 30.
    let mut sizes = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = sg
            .list_file_shares()
            .limit(50)
            .set_marker(marker.clone())
            .send()
            .await
            .expect("page");
        sizes.push(page.file_share_info_list().len());
        marker = page.next_marker().map(str::to_string);
        if marker.is_none() {
            break;
        }
    }
    assert_eq!(sizes, vec![50, 50, 30]);

    // A Limit above the configured maximum is capped by it.
    let page = sg
        .list_file_shares()
        .limit(5000)
        .send()
        .await
        .expect("list");
    assert_eq!(page.file_share_info_list().len(), 100);
    assert!(page.next_marker().is_some());

    // GatewayARN filters.
    let page = sg
        .list_file_shares()
        .gateway_arn(&gw1)
        .send()
        .await
        .expect("list gw1");
    assert_eq!(page.file_share_info_list().len(), 70);
    assert!(page
        .file_share_info_list()
        .iter()
        .all(|i| i.gateway_arn() == Some(gw1.as_str())));
    assert!(page.next_marker().is_none());

    // A smaller configured page size.
    sgw.set_max_page_size(7);
    let page = sg
        .list_file_shares()
        .gateway_arn(&gw2)
        .limit(100)
        .send()
        .await
        .expect("list gw2");
    assert_eq!(page.file_share_info_list().len(), 7);
    let items: Vec<_> = sg
        .list_file_shares()
        .gateway_arn(&gw2)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .expect("paginate gw2");
    assert_eq!(items.len(), 60);
}

#[tokio::test]
async fn list_marker_survives_removal_between_pages() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let arns: Vec<String> = (0..10)
        .map(|i| sgw.add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::b{i}")))
        .collect();
    let sg = client(&sgw).await;
    let first = sg.list_file_shares().limit(4).send().await.expect("page 1");
    assert_eq!(first.file_share_info_list().len(), 4);
    // Remove the last share of page 1 and one share of page 2.
    assert!(sgw.remove_share(&arns[3]));
    assert!(sgw.remove_share(&arns[5]));
    assert!(!sgw.remove_share(&arns[5]));
    let rest: Vec<String> = sg
        .list_file_shares()
        .limit(100)
        .marker(first.next_marker().expect("marker"))
        .send()
        .await
        .expect("page 2")
        .file_share_info_list()
        .iter()
        .filter_map(|i| i.file_share_arn().map(str::to_string))
        .collect();
    let expected: Vec<String> = [4, 6, 7, 8, 9].iter().map(|&i| arns[i].clone()).collect();
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn list_rejects_bad_input() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::b");
    let sg = client(&sgw).await;

    let err = sg
        .list_file_shares()
        .gateway_arn("arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-00000000")
        .send()
        .await
        .expect_err("unknown gateway");
    assert_eq!(err.status_code(), Some(400));
    match err.into_service_error() {
        ListFileSharesError::InvalidGatewayRequestException(e) => {
            assert_eq!(error_code(e.error()).as_deref(), Some("GatewayNotFound"));
            assert_eq!(e.message(), Some("The specified gateway was not found."));
        }
        other => panic!("expected InvalidGatewayRequestException, got {other:?}"),
    }

    let err = sg
        .list_file_shares()
        .marker("not-a-marker")
        .send()
        .await
        .expect_err("garbage marker");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());

    for limit in [0, -1, 10_001] {
        let err = sg
            .list_file_shares()
            .limit(limit)
            .send()
            .await
            .expect_err("bad limit");
        assert_eq!(err.status_code(), Some(400));
        assert_eq!(err.code(), Some("ValidationException"), "limit {limit}");
    }
    // The boundaries are accepted.
    sg.list_file_shares()
        .limit(1)
        .send()
        .await
        .expect("limit 1");
    sg.list_file_shares()
        .limit(10_000)
        .send()
        .await
        .expect("limit 10000");
}

#[tokio::test]
async fn describe_takes_one_to_ten_arns() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let arns: Vec<String> = (0..11)
        .map(|i| sgw.add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::b{i}")))
        .collect();
    let sg = client(&sgw).await;

    let err = sg
        .describe_nfs_file_shares()
        .set_file_share_arn_list(Some(arns.clone()))
        .send()
        .await
        .expect_err("11 ARNs");
    assert_eq!(err.status_code(), Some(400));
    assert_eq!(err.code(), Some("ValidationException"));
    assert!(err.message().is_some_and(|m| m.contains("10")));

    let err = sg
        .describe_smb_file_shares()
        .set_file_share_arn_list(Some(arns.clone()))
        .send()
        .await
        .expect_err("11 ARNs (SMB)");
    assert_eq!(err.code(), Some("ValidationException"));

    let err = sg
        .describe_nfs_file_shares()
        .set_file_share_arn_list(Some(Vec::new()))
        .send()
        .await
        .expect_err("0 ARNs");
    assert_eq!(err.code(), Some("ValidationException"));

    let ok = sg
        .describe_nfs_file_shares()
        .set_file_share_arn_list(Some(arns[..10].to_vec()))
        .send()
        .await
        .expect("10 ARNs");
    let got: Vec<&str> = ok
        .nfs_file_share_info_list()
        .iter()
        .filter_map(|i| i.file_share_arn())
        .collect();
    let want: Vec<&str> = arns[..10].iter().map(String::as_str).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn describe_shapes_parse_in_the_sdk() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let nfs = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::bucket-a");
    let smb = sgw.add_share(&gw, ShareKind::Smb, "arn:aws:s3:::bucket-b/some/prefix/");
    let sg = client(&sgw).await;

    let out = sg
        .describe_nfs_file_shares()
        .file_share_arn_list(&nfs)
        .send()
        .await
        .expect("describe nfs");
    let [info] = out.nfs_file_share_info_list() else {
        panic!("one NFS share expected")
    };
    assert_eq!(info.file_share_arn(), Some(nfs.as_str()));
    assert_eq!(info.gateway_arn(), Some(gw.as_str()));
    assert_eq!(info.location_arn(), Some("arn:aws:s3:::bucket-a"));
    assert_eq!(info.path(), Some("/bucket-a"));
    assert_eq!(info.file_share_status(), Some("AVAILABLE"));
    assert!(info.file_share_id().is_some_and(|id| nfs.ends_with(id)));
    assert!(info.role().is_some_and(|r| r.starts_with("arn:aws:iam::")));
    assert_eq!(info.default_storage_class(), Some("S3_STANDARD"));
    assert_eq!(
        info.nfs_file_share_defaults().and_then(|d| d.owner_id()),
        Some(65534)
    );

    let out = sg
        .describe_smb_file_shares()
        .file_share_arn_list(&smb)
        .send()
        .await
        .expect("describe smb");
    let [info] = out.smb_file_share_info_list() else {
        panic!("one SMB share expected")
    };
    assert_eq!(info.file_share_arn(), Some(smb.as_str()));
    assert_eq!(
        info.location_arn(),
        Some("arn:aws:s3:::bucket-b/some/prefix/")
    );
    assert_eq!(info.path(), Some("/bucket-b"));
    assert!(info.role().is_some());
    assert_eq!(info.default_storage_class(), Some("S3_STANDARD"));

    // A share of the other type is rejected, and so is an unknown share.
    let err = sg
        .describe_nfs_file_shares()
        .file_share_arn_list(&smb)
        .send()
        .await
        .expect_err("SMB share via DescribeNFSFileShares");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());

    assert!(sgw.remove_share(&nfs));
    let err = sg
        .describe_nfs_file_shares()
        .file_share_arn_list(&nfs)
        .send()
        .await
        .expect_err("removed share");
    match err.into_service_error() {
        DescribeNFSFileSharesError::InvalidGatewayRequestException(e) => {
            assert_eq!(error_code(e.error()).as_deref(), Some("FileShareNotFound"));
            assert_eq!(e.message(), Some("The specified file share was not found."));
        }
        other => panic!("expected InvalidGatewayRequestException, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_allows_two_in_flight_per_share() {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_secs(3600));
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    let b = sgw.add_share(&gw, ShareKind::Smb, "arn:aws:s3:::b");
    let sg = client(&sgw).await;

    let r1 = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect("1st");
    let r2 = sg
        .refresh_cache()
        .file_share_arn(&a)
        .folder_list("/x/y")
        .recursive(false)
        .send()
        .await
        .expect("2nd");
    assert_eq!(r1.file_share_arn(), Some(a.as_str()));
    assert_ne!(r1.notification_id(), r2.notification_id());
    assert!(r1.notification_id().is_some());
    assert_eq!(sgw.in_flight_refreshes(&a), 2);

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("3rd while two in flight");
    assert_eq!(err.status_code(), Some(400));
    match err.into_service_error() {
        RefreshCacheError::InvalidGatewayRequestException(e) => {
            assert!(e.message().is_some_and(|m| m.contains("too many requests")));
        }
        other => panic!("expected InvalidGatewayRequestException, got {other:?}"),
    }
    assert_eq!(sgw.rejected_refreshes(), 1);

    // The limit is per share.
    sg.refresh_cache()
        .file_share_arn(&b)
        .send()
        .await
        .expect("other share");

    sgw.complete_refreshes();
    assert_eq!(sgw.in_flight_refreshes(&a), 0);
    let r4 = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect("after completion");

    let records = sgw.refreshes();
    assert_eq!(records.len(), 4);
    assert_eq!(records[0].share_arn, a);
    assert_eq!(records[0].folder_list, vec!["/".to_string()]);
    assert!(records[0].recursive);
    assert_eq!(records[1].folder_list, vec!["/x/y".to_string()]);
    assert!(!records[1].recursive);
    assert_eq!(records[2].share_arn, b);
    assert_eq!(
        records[3].notification_id,
        r4.notification_id().expect("id")
    );
    let ids: HashSet<_> = records.iter().map(|r| r.notification_id.clone()).collect();
    assert_eq!(ids.len(), 4);
    assert!(records
        .windows(2)
        .all(|w| w[0].started_at <= w[1].started_at));
    assert_eq!(sgw.calls_to("RefreshCache"), 5);
}

#[tokio::test]
async fn refreshes_complete_after_the_configured_duration() {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_millis(1000));
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    let sg = client(&sgw).await;

    for _ in 0..2 {
        sg.refresh_cache()
            .file_share_arn(&a)
            .send()
            .await
            .expect("accepted");
    }
    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("third rejected");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(sgw.in_flight_refreshes(&a), 0);
    sg.refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect("accepted once the earlier ones completed");
    assert_eq!(sgw.refreshes().len(), 3);
    assert_eq!(sgw.rejected_refreshes(), 1);
}

#[tokio::test]
async fn refresh_validates_the_folder_list() {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_secs(3600));
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    let sg = client(&sgw).await;

    let folders = |n: usize| (0..n).map(|i| format!("/dir{i}")).collect::<Vec<_>>();

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .set_folder_list(Some(folders(51)))
        .send()
        .await
        .expect_err("51 folders");
    assert_eq!(err.status_code(), Some(400));
    assert_eq!(err.code(), Some("ValidationException"));

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .set_folder_list(Some(Vec::new()))
        .send()
        .await
        .expect_err("0 folders");
    assert_eq!(err.code(), Some("ValidationException"));

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .folder_list("x".repeat(1025))
        .send()
        .await
        .expect_err("folder of 1025 characters");
    assert_eq!(err.code(), Some("ValidationException"));

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .folder_list("/ok")
        .folder_list("/trailing/")
        .send()
        .await
        .expect_err("trailing slash");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());

    assert!(
        sgw.refreshes().is_empty(),
        "no rejected call started a refresh"
    );
    assert_eq!(sgw.rejected_refreshes(), 0, "validation is not throttling");

    // The boundaries are accepted: 50 folders, 1024 characters, and "/".
    let longest = format!("/{}", "y".repeat(1023));
    sg.refresh_cache()
        .file_share_arn(&a)
        .set_folder_list(Some(folders(50)))
        .send()
        .await
        .expect("50 folders");
    sg.refresh_cache()
        .file_share_arn(&a)
        .folder_list("/")
        .folder_list(&longest)
        .send()
        .await
        .expect("'/' and 1024 characters");
    let records = sgw.refreshes();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].folder_list.len(), 50);
    assert_eq!(records[1].folder_list[0], "/");
}

#[tokio::test]
async fn refresh_of_unknown_share_is_rejected() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    assert!(sgw.remove_share(&a));
    let sg = client(&sgw).await;

    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("removed share");
    match err.into_service_error() {
        RefreshCacheError::InvalidGatewayRequestException(e) => {
            assert_eq!(error_code(e.error()).as_deref(), Some("FileShareNotFound"));
        }
        other => panic!("expected InvalidGatewayRequestException, got {other:?}"),
    }
    assert!(sgw.refreshes().is_empty());
    assert_eq!(sgw.calls_to("RefreshCache"), 1);
}

#[tokio::test]
async fn injected_internal_error_reaches_the_sdk_as_5xx() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    let sg = client_no_retry(&sgw).await;

    sgw.fail_next("RefreshCache", 1, InjectedFailure::InternalError);
    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("injected 500");
    assert_eq!(err.status_code(), Some(500));
    match err.into_service_error() {
        RefreshCacheError::InternalServerError(e) => {
            assert_eq!(error_code(e.error()).as_deref(), Some("InternalError"));
        }
        other => panic!("expected InternalServerError, got {other:?}"),
    }
    assert!(
        sgw.refreshes().is_empty(),
        "a failed call starts no refresh"
    );

    // Only the next call failed.
    sg.refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect("second call succeeds");

    sgw.fail_next("ListFileShares", 1, InjectedFailure::ServiceUnavailable);
    let err = sg
        .list_file_shares()
        .send()
        .await
        .expect_err("injected 503");
    assert_eq!(err.status_code(), Some(503));
    assert_eq!(err.code(), Some("ServiceUnavailableError"));

    let calls = sgw.calls();
    let summary: Vec<(&str, u16, bool)> = calls
        .iter()
        .map(|c| (c.operation.as_str(), c.status, c.injected))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("RefreshCache", 500, true),
            ("RefreshCache", 200, false),
            ("ListFileShares", 503, true),
        ]
    );
    assert_eq!(calls[0].body["FileShareARN"], a.as_str());
    assert_eq!(calls[0].error_type.as_deref(), Some("InternalServerError"));
    assert_eq!(sgw.refreshes().len(), 1);
}

#[tokio::test]
async fn sdk_retries_injected_5xx_and_succeeds() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");
    // A fast retry policy with the default 3 attempts.
    let retry = RetryConfig::standard()
        .with_max_attempts(3)
        .with_initial_backoff(Duration::from_millis(1))
        .with_max_backoff(Duration::from_millis(5));
    let sg = client_with(&sgw, Some(retry)).await;

    sgw.fail_next("RefreshCache", 2, InjectedFailure::InternalError);
    sg.refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect("third attempt succeeds");
    assert_eq!(sgw.calls_to("RefreshCache"), 3);
    assert_eq!(sgw.refreshes().len(), 1);

    // Three failures exhaust the attempts.
    sgw.complete_refreshes();
    sgw.fail_next("RefreshCache", 3, InjectedFailure::ServiceUnavailable);
    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("all attempts fail");
    assert_eq!(err.status_code(), Some(503));
    assert_eq!(sgw.calls_to("RefreshCache"), 6);

    // The throttle answer is a 400 and is not retried.
    sgw.fail_next("RefreshCache", 1, InjectedFailure::Throttle);
    let err = sg
        .refresh_cache()
        .file_share_arn(&a)
        .send()
        .await
        .expect_err("throttled");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());
    assert_eq!(sgw.calls_to("RefreshCache"), 7);
    assert_eq!(sgw.rejected_refreshes(), 1);
    assert_eq!(sgw.refreshes().len(), 1);

    sgw.reset_calls();
    assert!(sgw.calls().is_empty());
    assert!(sgw.refreshes().is_empty());
    assert_eq!(sgw.rejected_refreshes(), 0);
}

#[tokio::test]
async fn concurrent_clients_are_all_served_and_recorded() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    for i in 0..5 {
        sgw.add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::b{i}"));
    }
    let sg = client_no_retry(&sgw).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let sg = sg.clone();
        tasks.spawn(async move { sg.list_file_shares().send().await });
    }
    while let Some(res) = tasks.join_next().await {
        let out = res.expect("task").expect("list");
        assert_eq!(out.file_share_info_list().len(), 5);
    }
    assert_eq!(sgw.calls_to("ListFileShares"), 32);
    assert!(sgw.calls().iter().all(|c| c.status == 200));
}

/// One raw HTTP/1.1 request; returns the status and the parsed JSON body.
async fn raw_post(
    sgw: &SgwStandIn,
    target: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value, String) {
    let mut stream = tokio::net::TcpStream::connect(sgw.local_addr())
        .await
        .expect("connect");
    let target = target
        .map(|t| format!("X-Amz-Target: {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-amz-json-1.1\r\n\
         {target}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let json = serde_json::from_str(body).expect("JSON body");
    (status, json, head.to_ascii_lowercase())
}

#[tokio::test]
async fn protocol_errors_have_the_real_shapes() {
    let sgw = standin().await;
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::a");

    let (status, body, head) = raw_post(
        &sgw,
        Some("StorageGateway_20130630.DescribeGatewayInformation"),
        "{}",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        serde_json::json!({"__type": "UnknownOperationException"})
    );
    assert!(head.contains("content-type: application/x-amz-json-1.1"));
    assert!(head.contains("x-amzn-requestid:"));

    let (status, body, _) = raw_post(&sgw, None, "{}").await;
    assert_eq!(status, 400);
    assert_eq!(body["__type"], "UnknownOperationException");

    let (status, body, _) = raw_post(
        &sgw,
        Some("StorageGateway_20130630.RefreshCache"),
        "{not json",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["__type"], "SerializationException");

    let (status, body, _) = raw_post(
        &sgw,
        Some("StorageGateway_20130630.RefreshCache"),
        r#"{"FileShareARN": 7}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["__type"], "SerializationException");

    let (status, body, _) =
        raw_post(&sgw, Some("StorageGateway_20130630.RefreshCache"), "{}").await;
    assert_eq!(status, 400);
    assert_eq!(body["__type"], "ValidationException");

    let (status, body, _) = raw_post(
        &sgw,
        Some("StorageGateway_20130630.RefreshCache"),
        &format!(r#"{{"FileShareARN": "{a}"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["FileShareARN"], a.as_str());
    assert!(body["NotificationId"].is_string());

    let (status, body, _) = raw_post(
        &sgw,
        Some("StorageGateway_20130630.DescribeSMBFileShares"),
        r#"{"FileShareARNList": ["arn:aws:storagegateway:us-east-1:123456789012:share/share-00000000"]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["__type"], "InvalidGatewayRequestException");
    assert_eq!(body["message"], "The specified file share was not found.");
    assert_eq!(body["error"]["errorCode"], "FileShareNotFound");
    assert!(body["error"]["errorDetails"].is_object());

    // Every request was recorded, in order, malformed ones included.
    let ops: Vec<(String, u16)> = sgw
        .calls()
        .into_iter()
        .map(|c| (c.operation, c.status))
        .collect();
    assert_eq!(
        ops,
        vec![
            ("DescribeGatewayInformation".to_string(), 400),
            (String::new(), 400),
            ("RefreshCache".to_string(), 400),
            ("RefreshCache".to_string(), 400),
            ("RefreshCache".to_string(), 400),
            ("RefreshCache".to_string(), 200),
            ("DescribeSMBFileShares".to_string(), 400),
        ]
    );
    assert_eq!(sgw.calls()[2].body, serde_json::Value::Null);
}

// ---- the cache model: what a share sees, and what a refresh costs ----

/// A stand-in whose refreshes complete at once (so a test can send many in a row), a
/// client that never retries (one call is one request), and a gateway.
async fn modelled_standin() -> (SgwStandIn, Client, String) {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::ZERO);
    let gw = sgw.add_gateway("gw");
    let sg = client_no_retry(&sgw).await;
    (sgw, sg, gw)
}

fn bucket_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

fn keys(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|k| k.to_string()).collect()
}

fn work(objects_listed: u64, prefixes_listed: u64, list_requests: u64) -> ListingWork {
    ListingWork {
        objects_listed,
        prefixes_listed,
        list_requests,
    }
}

/// Sends one accepted RefreshCache and returns its record.
async fn refresh(
    sgw: &SgwStandIn,
    sg: &Client,
    share: &str,
    folders: &[&str],
    recursive: bool,
) -> RefreshRecord {
    let out = sg
        .refresh_cache()
        .file_share_arn(share)
        .set_folder_list(Some(folders.iter().map(|f| f.to_string()).collect()))
        .recursive(recursive)
        .send()
        .await
        .expect("refresh accepted");
    let id = out.notification_id().expect("notification id");
    sgw.refreshes()
        .into_iter()
        .find(|r| r.notification_id == id)
        .expect("the refresh is recorded")
}

#[tokio::test]
async fn refreshing_a_new_folders_ancestors_shows_an_object_at_a_new_depth() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::new();
    model.put("a/x.txt");
    model.put("top.txt");
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    // A new share starts as a snapshot of the bucket, which costs no listing work.
    assert_eq!(sgw.share_view(&share), keys(&["a/x.txt", "top.txt"]));
    assert_eq!(sgw.share_folders_view(&share), keys(&["a/"]));
    assert_eq!(sgw.total_listing_work(), ListingWork::default());

    // Two new folders, b and c, below the cached folder a.
    assert!(model.put("a/b/c/new.txt"));
    assert_eq!(
        sgw.share_view(&share),
        keys(&["a/x.txt", "top.txt"]),
        "the cache is stale until a refresh"
    );

    let record = refresh(&sgw, &sg, &share, &["/a", "/a/b", "/a/b/c"], false).await;
    assert_eq!(sgw.share_view(&share), model.snapshot());
    assert_eq!(
        sgw.share_folders_view(&share),
        keys(&["a/", "a/b/", "a/b/c/"])
    );
    // "/a": x.txt and b/; "/a/b": c/; "/a/b/c": new.txt. One page each.
    assert_eq!(record.work, work(2, 2, 3));
    assert_eq!(record.listing_error, None);
    assert_eq!(sgw.listing_work(&share), work(2, 2, 3));
    assert_eq!(sgw.total_listing_work(), work(2, 2, 3));
}

#[tokio::test]
async fn refreshing_only_the_changed_folder_misses_an_object_in_a_new_folder() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::new();
    model.put("a/x.txt");
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    model.put("a/b/c/new.txt");

    // The folder of the new object is listed, but no cached folder leads to it.
    let record = refresh(&sgw, &sg, &share, &["/a/b/c"], false).await;
    assert_eq!(record.work, work(1, 0, 1), "new.txt was listed");
    assert_eq!(sgw.share_view(&share), keys(&["a/x.txt"]));
    assert_eq!(sgw.share_folders_view(&share), keys(&["a/"]));

    // The parent alone shows b, but b was never listed, so it looks empty.
    let record = refresh(&sgw, &sg, &share, &["/a"], false).await;
    assert_eq!(record.work, work(1, 1, 1));
    assert_eq!(sgw.share_folders_view(&share), keys(&["a/", "a/b/"]));
    assert_eq!(sgw.share_view(&share), keys(&["a/x.txt"]));

    // Listing b links c in; c's listing from the first refresh is still cached.
    let record = refresh(&sgw, &sg, &share, &["/a/b"], false).await;
    assert_eq!(record.work, work(0, 1, 1));
    assert_eq!(sgw.share_view(&share), model.snapshot());
    assert_eq!(sgw.listing_work(&share), work(2, 2, 3));
}

#[tokio::test]
async fn recursive_refresh_of_the_root_makes_the_view_equal_the_bucket() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::with_objects(30, 3);
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Smb, &bucket_arn("b"));
    assert_eq!(sgw.share_view(&share), model.snapshot());

    for key in [
        "new/deep/er/1",
        "new/2",
        "dir00001/sub/3",
        "4",
        "dir00002/5",
    ] {
        assert!(model.put(key));
    }
    assert!(model.delete(&BucketModel::object_key(0, 3)));
    assert!(model.delete(&BucketModel::object_key(2, 5)));
    assert_eq!(model.len(), 33);
    assert_ne!(sgw.share_view(&share), model.snapshot());

    // The defaults: FolderList ["/"], Recursive true.
    let out = sg
        .refresh_cache()
        .file_share_arn(&share)
        .send()
        .await
        .expect("refresh accepted");
    let record = sgw.refreshes().pop().expect("a record");
    assert_eq!(Some(record.notification_id.as_str()), out.notification_id());
    assert_eq!(record.folder_list, vec!["/".to_string()]);
    assert!(record.recursive);
    assert_eq!(sgw.share_view(&share), model.snapshot());
    assert_eq!(sgw.share_view(&share).len(), 33);
    assert!(sgw.share_folders_view(&share).contains("new/deep/er/"));
    // Every object once, no prefixes, one page.
    assert_eq!(record.work, work(33, 0, 1));

    // A bigger bucket pages at 1000 keys.
    let big = BucketModel::with_objects(2500, 5);
    sgw.set_bucket_source("big", BucketSource::Model(big.clone()));
    let big_share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("big"));
    big.put("dir00004/late");
    let record = refresh(&sgw, &sg, &big_share, &["/"], true).await;
    assert_eq!(record.work, work(2501, 0, 3));
    assert_eq!(sgw.share_view(&big_share), big.snapshot());
    let record = refresh(&sgw, &sg, &big_share, &["/"], false).await;
    assert_eq!(record.work, work(0, 5, 1));
    assert_eq!(sgw.total_listing_work(), work(33 + 2501, 5, 1 + 3 + 1));
}

#[tokio::test]
async fn listing_work_is_exact_for_three_folders_of_ten_objects() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::with_objects(30, 3);
    let a = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    let b = sgw.add_share(&gw, ShareKind::Smb, &bucket_arn("b"));
    // A source set after the shares exist snapshots them too.
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    assert_eq!(sgw.share_view(&a), model.snapshot());
    assert_eq!(sgw.share_view(&b), model.snapshot());

    // The root (3 prefixes) and each folder (10 objects): four one-page listings.
    let record = refresh(
        &sgw,
        &sg,
        &a,
        &["/", "/dir00000", "/dir00001", "/dir00002"],
        false,
    )
    .await;
    assert_eq!(record.work, work(30, 3, 4));
    // One folder, recursively.
    let record = refresh(&sgw, &sg, &b, &["/dir00001"], true).await;
    assert_eq!(record.work, work(10, 0, 1));
    // A folder that is not in the bucket lists as empty, and still costs a request.
    let record = refresh(&sgw, &sg, &a, &["/nope"], false).await;
    assert_eq!(record.work, work(0, 0, 1));
    assert_eq!(sgw.share_view(&a), model.snapshot());

    assert_eq!(sgw.listing_work(&a), work(30, 3, 5));
    assert_eq!(sgw.listing_work(&b), work(10, 0, 1));
    assert_eq!(sgw.total_listing_work(), work(40, 3, 6));
    assert_eq!(
        sgw.listing_work(&a) + sgw.listing_work(&b),
        sgw.total_listing_work()
    );

    // A share whose bucket has no source: accepted, recorded, no model, no work.
    let plain = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("unmodelled"));
    let record = refresh(&sgw, &sg, &plain, &["/"], true).await;
    assert_eq!(record.work, ListingWork::default());
    assert!(sgw.share_view(&plain).is_empty());
    assert_eq!(sgw.total_listing_work(), work(40, 3, 6));

    sgw.reset_listing_work();
    assert_eq!(sgw.total_listing_work(), ListingWork::default());
    assert_eq!(sgw.listing_work(&a), ListingWork::default());
    assert_eq!(
        sgw.refreshes()[0].work,
        work(30, 3, 4),
        "records keep theirs"
    );
    // Counting starts again from zero.
    refresh(&sgw, &sg, &b, &["/dir00002"], false).await;
    assert_eq!(sgw.total_listing_work(), work(10, 0, 1));
    assert_eq!(sgw.listing_work(&a), ListingWork::default());
}

#[tokio::test]
async fn deleted_objects_disappear_after_a_refresh_of_their_folder() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::with_objects(30, 3);
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));

    let gone = BucketModel::object_key(1, 1);
    assert!(model.delete(&gone));
    assert!(
        sgw.share_view(&share).contains(&gone),
        "stale until refreshed"
    );
    refresh(&sgw, &sg, &share, &["/dir00000"], false).await;
    assert!(
        sgw.share_view(&share).contains(&gone),
        "another folder's refresh does not cover it"
    );
    let record = refresh(&sgw, &sg, &share, &["/dir00001"], false).await;
    assert_eq!(record.work, work(9, 0, 1));
    assert!(!sgw.share_view(&share).contains(&gone));
    assert_eq!(sgw.share_view(&share), model.snapshot());

    // Empty a whole folder: its own refresh empties it, the parent's removes it.
    for key in model.keys_with_prefix("dir00002/") {
        assert!(model.delete(&key));
    }
    refresh(&sgw, &sg, &share, &["/dir00002"], false).await;
    assert_eq!(sgw.share_view(&share), model.snapshot());
    assert!(sgw.share_folders_view(&share).contains("dir00002/"));
    let record = refresh(&sgw, &sg, &share, &["/"], false).await;
    assert_eq!(record.work, work(0, 2, 1));
    assert_eq!(
        sgw.share_folders_view(&share),
        keys(&["dir00000/", "dir00001/"])
    );

    // A vanished folder's cached contents are dropped with it: when a folder of that
    // name comes back, it is not listed until its own refresh.
    model.put("dir00000/sub/1");
    refresh(&sgw, &sg, &share, &["/dir00000", "/dir00000/sub"], false).await;
    assert!(sgw.share_view(&share).contains("dir00000/sub/1"));
    model.delete("dir00000/sub/1");
    refresh(&sgw, &sg, &share, &["/dir00000"], false).await;
    model.put("dir00000/sub/2");
    refresh(&sgw, &sg, &share, &["/dir00000"], false).await;
    assert!(sgw.share_folders_view(&share).contains("dir00000/sub/"));
    let view = sgw.share_view(&share);
    assert!(!view.contains("dir00000/sub/1") && !view.contains("dir00000/sub/2"));
    refresh(&sgw, &sg, &share, &["/dir00000/sub"], false).await;
    assert_eq!(sgw.share_view(&share), model.snapshot());
}

#[tokio::test]
async fn a_prefix_share_maps_its_folders_under_the_prefix() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::new();
    for key in [
        "data/top.txt",
        "data/x/1.txt",
        "other/2.txt",
        "x/3.txt",
        "datum",
    ] {
        model.put(key);
    }
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let data = sgw.add_share(&gw, ShareKind::Smb, "arn:aws:s3:::b/data/");
    let root = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    assert_eq!(
        sgw.share_view(&data),
        keys(&["data/top.txt", "data/x/1.txt"])
    );
    assert_eq!(sgw.share_folders_view(&data), keys(&["data/x/"]));
    assert_eq!(sgw.share_view(&root), model.snapshot());

    model.put("data/x/new.txt");
    model.put("x/new.txt");
    // "/x" on the data/ share is the key prefix data/x/.
    let record = refresh(&sgw, &sg, &data, &["/x"], false).await;
    assert_eq!(record.work, work(2, 0, 1));
    assert_eq!(
        sgw.share_view(&data),
        keys(&["data/top.txt", "data/x/1.txt", "data/x/new.txt"])
    );
    // "/x" on the root share is the key prefix x/.
    let record = refresh(&sgw, &sg, &root, &["/x"], false).await;
    assert_eq!(record.work, work(2, 0, 1));
    let view = sgw.share_view(&root);
    assert!(view.contains("x/new.txt"));
    assert!(
        !view.contains("data/x/new.txt"),
        "the root share's data/x is stale"
    );

    // A recursive refresh of the data/ share lists only keys under data/.
    model.put("data/y/z/deep.txt");
    let record = refresh(&sgw, &sg, &data, &["/"], true).await;
    assert_eq!(record.work, work(4, 0, 1));
    assert_eq!(sgw.share_view(&data), model.keys_with_prefix("data/"));
    assert_eq!(
        sgw.share_folders_view(&data),
        keys(&["data/x/", "data/y/", "data/y/z/"])
    );
}

#[tokio::test]
async fn malformed_folder_paths_are_rejected() {
    let (sgw, sg, gw) = modelled_standin().await;
    let model = BucketModel::with_objects(4, 2);
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    model.put("dir00000/new");

    for bad in ["a", "a/b", "dir00000", "/a/", "//", "/a//b", "//a", "/a/b/"] {
        let err = sg
            .refresh_cache()
            .file_share_arn(&share)
            .folder_list("/")
            .folder_list(bad)
            .send()
            .await
            .expect_err("malformed folder");
        assert_eq!(err.status_code(), Some(400), "{bad}");
        match err.into_service_error() {
            RefreshCacheError::InvalidGatewayRequestException(e) => {
                assert_eq!(
                    error_code(e.error()).as_deref(),
                    Some("InvalidParameters"),
                    "{bad}"
                );
                let message = e.message().unwrap_or_default();
                assert!(message.contains(&format!("'{bad}'")), "{message}");
            }
            other => panic!("{bad}: expected InvalidGatewayRequestException, got {other:?}"),
        }
    }
    let too_long = format!("/{}", "y".repeat(1024));
    for bad in [String::new(), too_long] {
        let err = sg
            .refresh_cache()
            .file_share_arn(&share)
            .folder_list(&bad)
            .send()
            .await
            .expect_err("folder of the wrong length");
        assert_eq!(err.code(), Some("ValidationException"));
    }
    assert!(sgw.refreshes().is_empty(), "nothing was accepted");
    assert_eq!(sgw.total_listing_work(), ListingWork::default());
    assert!(!sgw.share_view(&share).contains("dir00000/new"));

    // Well-formed paths, up to 1024 characters, are accepted.
    let longest = format!("/{}", "y".repeat(1023));
    assert_eq!(longest.chars().count(), 1024);
    let record = refresh(&sgw, &sg, &share, &["/", "/dir00000", &longest], false).await;
    assert_eq!(record.work, work(3, 2, 3));
    assert_eq!(sgw.share_view(&share), model.snapshot());
}

#[tokio::test]
async fn a_refresh_lists_when_it_is_accepted_and_a_rejected_one_does_not() {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_secs(3600));
    let gw = sgw.add_gateway("gw");
    let model = BucketModel::new();
    sgw.set_bucket_source("b", BucketSource::Model(model.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    let sg = client_no_retry(&sgw).await;

    model.put("1");
    refresh(&sgw, &sg, &share, &["/"], false).await;
    assert_eq!(sgw.share_view(&share), keys(&["1"]));
    model.put("2");
    refresh(&sgw, &sg, &share, &["/"], false).await;
    assert_eq!(sgw.share_view(&share), keys(&["1", "2"]));
    model.put("3");
    let err = sg
        .refresh_cache()
        .file_share_arn(&share)
        .send()
        .await
        .expect_err("a third refresh in flight");
    assert!(err
        .into_service_error()
        .is_invalid_gateway_request_exception());
    assert_eq!(sgw.share_view(&share), keys(&["1", "2"]));
    assert_eq!(sgw.total_listing_work(), work(3, 0, 2));

    sgw.complete_refreshes();
    refresh(&sgw, &sg, &share, &["/"], true).await;
    assert_eq!(sgw.share_view(&share), keys(&["1", "2", "3"]));
    assert_eq!(sgw.total_listing_work(), work(6, 0, 3));
}

/// moto, an S3 client for it, and a fresh bucket holding `objects`.
async fn moto_bucket(objects: &[&str]) -> (Moto, aws_sdk_s3::Client, String) {
    let moto = Moto::start().await.expect("moto starts");
    let s3 = Clients::new(&sdk_config(moto.endpoint()).await).s3;
    let bucket = unique_name("sgw-view");
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket");
    for key in objects {
        put(&s3, &bucket, key).await;
    }
    (moto, s3, bucket)
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .expect("put object");
}

/// Every key in the bucket, read from S3 independently of the stand-in.
async fn s3_keys(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> BTreeSet<String> {
    let pages: Vec<_> = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .expect("list bucket");
    pages
        .iter()
        .flat_map(|p| p.contents())
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn s3_source_refreshes_from_moto() {
    let (_moto, s3, bucket) = moto_bucket(&["a/1.txt", "a/2.txt", "b/3.txt", "top.txt"]).await;
    let (sgw, sg, gw) = modelled_standin().await;
    sgw.set_bucket_source(&bucket, BucketSource::S3(s3.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn(&bucket));
    // add_share cannot wait on S3: the cache is empty until primed.
    assert!(sgw.share_view(&share).is_empty());
    sgw.prime_share_cache(&share).await.expect("prime");
    assert_eq!(
        sgw.share_view(&share),
        keys(&["a/1.txt", "a/2.txt", "b/3.txt", "top.txt"])
    );
    assert_eq!(sgw.total_listing_work(), ListingWork::default());

    put(&s3, &bucket, "a/new/4.txt").await;
    s3.delete_object()
        .bucket(&bucket)
        .key("b/3.txt")
        .send()
        .await
        .expect("delete");

    let record = refresh(&sgw, &sg, &share, &["/a", "/a/new"], false).await;
    assert_eq!(record.listing_error, None);
    // "/a": 1.txt, 2.txt and new/; "/a/new": 4.txt.
    assert_eq!(record.work, work(3, 1, 2));
    let view = sgw.share_view(&share);
    assert!(view.contains("a/new/4.txt"));
    assert!(view.contains("b/3.txt"), "b was not refreshed");

    let record = refresh(&sgw, &sg, &share, &["/b"], false).await;
    assert_eq!(record.work, work(0, 0, 1));
    assert_eq!(sgw.share_view(&share), s3_keys(&s3, &bucket, "").await);
    assert_eq!(
        sgw.share_view(&share),
        keys(&["a/1.txt", "a/2.txt", "a/new/4.txt", "top.txt"])
    );

    // A prefix share on the same bucket, and a recursive refresh of the root share.
    let a_share = sgw.add_share(&gw, ShareKind::Smb, &format!("arn:aws:s3:::{bucket}/a/"));
    sgw.prime_share_cache(&a_share).await.expect("prime");
    assert_eq!(sgw.share_view(&a_share), s3_keys(&s3, &bucket, "a/").await);
    put(&s3, &bucket, "a/new/5.txt").await;
    let record = refresh(&sgw, &sg, &a_share, &["/new"], false).await;
    assert_eq!(record.work, work(2, 0, 1));
    assert_eq!(sgw.share_view(&a_share), s3_keys(&s3, &bucket, "a/").await);
    let record = refresh(&sgw, &sg, &share, &["/"], true).await;
    assert_eq!(record.work, work(5, 0, 1));
    assert_eq!(sgw.share_view(&share), s3_keys(&s3, &bucket, "").await);
    assert_eq!(sgw.listing_work(&share), work(8, 1, 4));
    assert_eq!(sgw.total_listing_work(), work(10, 1, 5));
}

#[tokio::test]
async fn s3_listing_failure_is_recorded_and_the_refresh_still_accepted() {
    let (_moto, s3, _bucket) = moto_bucket(&[]).await;
    let (sgw, sg, gw) = modelled_standin().await;
    let missing = unique_name("sgw-missing");
    sgw.set_bucket_source(&missing, BucketSource::S3(s3));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn(&missing));

    let record = refresh(&sgw, &sg, &share, &["/", "/a"], false).await;
    let error = record.listing_error.expect("the failure is recorded");
    assert!(error.starts_with("/: ListObjectsV2"), "{error}");
    assert!(error.contains("NoSuchBucket"), "{error}");
    assert_eq!(record.work, ListingWork::default(), "no page was read");
    assert!(sgw.share_view(&share).is_empty());
    assert_eq!(sgw.refreshes().len(), 1);
    let err = sgw
        .prime_share_cache(&share)
        .await
        .expect_err("priming from a missing bucket fails");
    assert!(err.contains("NoSuchBucket"), "{err}");
}

#[tokio::test]
async fn s3_source_pages_at_1000_entries() {
    let (_moto, s3, bucket) = moto_bucket(&["p/sub/x"]).await;
    // 1000 more keys directly under p/, written 16 at a time.
    let mut tasks = tokio::task::JoinSet::new();
    let names: Vec<String> = (0..1000).map(|i| format!("p/k{i:04}")).collect();
    for chunk in names.chunks(63) {
        let (s3, bucket, chunk) = (s3.clone(), bucket.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for key in chunk {
                put(&s3, &bucket, &key).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("put task");
    }
    let (sgw, sg, gw) = modelled_standin().await;
    sgw.set_bucket_source(&bucket, BucketSource::S3(s3.clone()));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn(&bucket));

    // 1000 objects and one prefix: 1001 entries, two pages.
    let record = refresh(&sgw, &sg, &share, &["/p"], false).await;
    assert_eq!(record.listing_error, None);
    assert_eq!(record.work, work(1000, 1, 2));
    // 1001 keys, two pages.
    let record = refresh(&sgw, &sg, &share, &["/"], true).await;
    assert_eq!(record.work, work(1001, 0, 2));
    assert_eq!(sgw.share_view(&share), s3_keys(&s3, &bucket, "").await);
    assert_eq!(sgw.share_view(&share).len(), 1001);
}

// ---- completion: its time, the in-flight limit, strict mode, refresh-complete events ----

/// A share on a bucket without a source, on a stand-in whose refreshes take `base`.
async fn timed_standin(base: Duration) -> (SgwStandIn, Client, String, String) {
    let sgw = standin().await;
    sgw.set_refresh_duration(base);
    let gw = sgw.add_gateway("gw");
    let share = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::plain");
    let sg = client_no_retry(&sgw).await;
    (sgw, sg, gw, share)
}

/// One RefreshCache of the whole share; its NotificationId, or the error.
async fn try_refresh(sg: &Client, share: &str) -> Result<String, SdkError<RefreshCacheError>> {
    sg.refresh_cache()
        .file_share_arn(share)
        .send()
        .await
        .map(|out| out.notification_id().unwrap_or_default().to_string())
}

fn is_busy(result: &Result<String, SdkError<RefreshCacheError>>) -> bool {
    match result {
        Err(SdkError::ServiceError(e)) => e.err().is_invalid_gateway_request_exception(),
        _ => false,
    }
}

fn completed_after_start(event: &CompletionEvent) -> Duration {
    event
        .completed
        .duration_since(event.started)
        .expect("completed after started")
}

#[tokio::test]
async fn the_in_flight_limit_frees_exactly_when_a_refresh_completes() {
    let (sgw, sg, _gw, a) = timed_standin(Duration::from_millis(600)).await;
    let t0 = std::time::Instant::now();
    let first = try_refresh(&sg, &a).await.expect("1st");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = try_refresh(&sg, &a).await.expect("2nd");
    let third = try_refresh(&sg, &a).await;
    assert!(is_busy(&third), "3rd while two in flight: {third:?}");
    assert_eq!(sgw.rejected_refreshes(), 1);

    // Completions only grow and the in-flight count only shrinks, and each completion
    // is one refresh fewer in flight: in_flight == 2 - completions at every instant.
    // Reading the completions before and after the count brackets it, race-free.
    let mut seen_one = false;
    while sgw.completion_events().len() < 2 {
        let before = sgw.completion_events().len();
        let in_flight = sgw.in_flight_refreshes(&a);
        let after = sgw.completion_events().len();
        assert!(
            2 - after <= in_flight && in_flight <= 2 - before,
            "{before} completed, {in_flight} in flight, {after} completed"
        );
        if after == 1 && !seen_one {
            seen_one = true;
            // The first one completed: a call is accepted at once, and then the share
            // is full again.
            assert!(t0.elapsed() >= Duration::from_millis(600));
            try_refresh(&sg, &a)
                .await
                .expect("accepted once one completed");
            let busy = try_refresh(&sg, &a).await;
            assert!(is_busy(&busy), "full again: {busy:?}");
            assert_eq!(sgw.rejected_refreshes(), 2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_one);

    let events = sgw
        .wait_for_completion_events(3, Duration::from_secs(5))
        .await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].notification_id, first);
    assert_eq!(events[1].notification_id, second);
    for event in &events {
        assert_eq!(completed_after_start(event), Duration::from_millis(600));
        assert!(!event.forced);
        // Events are off by default: recorded, not sent.
        assert_eq!(
            (event.region.as_deref(), event.copies, event.dropped),
            (None, 0, false)
        );
        assert!(event.event_ids.is_empty() && event.errors.is_empty());
        assert!(event.is_settled());
    }
    assert_eq!(sgw.in_flight_refreshes(&a), 0);

    // complete_refreshes() still forces completion, and records it as forced.
    sgw.set_refresh_duration(Duration::from_secs(3600));
    let forced = try_refresh(&sg, &a).await.expect("accepted");
    assert_eq!(sgw.in_flight_refreshes(&a), 1);
    sgw.complete_refreshes();
    assert_eq!(sgw.in_flight_refreshes(&a), 0);
    let events = sgw.completion_events();
    let last = events.last().expect("a completion");
    assert_eq!(last.notification_id, forced);
    assert!(last.forced);
    assert!(completed_after_start(last) < Duration::from_secs(5));
}

#[tokio::test]
async fn refresh_duration_grows_with_the_objects_listed() {
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_millis(200));
    sgw.set_refresh_time_per_object(Duration::from_millis(5));
    let gw = sgw.add_gateway("gw");
    // 100 objects in dir00000, 100 in dir00001.
    sgw.set_bucket_source("b", BucketSource::Model(BucketModel::with_objects(200, 2)));
    let small = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    let big = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("b"));
    let plain = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn("unmodelled"));
    let sg = client_no_retry(&sgw).await;

    let t0 = std::time::Instant::now();
    // The root, delimited: two prefixes, no objects; 200 ms.
    let r_small = refresh(&sgw, &sg, &small, &["/"], false).await;
    assert_eq!(r_small.work.objects_listed, 0);
    // One folder recursively and the root recursively: 100 + 200 objects; 200 + 1500 ms.
    let r_big = refresh(&sgw, &sg, &big, &["/dir00000", "/"], true).await;
    assert_eq!(r_big.work.objects_listed, 300);
    // No source: no listing, the base only.
    let r_plain = refresh(&sgw, &sg, &plain, &["/"], true).await;
    assert_eq!(r_plain.work, ListingWork::default());

    let events = sgw
        .wait_for_completion_events(2, Duration::from_secs(5))
        .await;
    assert_eq!(
        events.len(),
        2,
        "the big refresh is still running: {events:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(1700));
    assert_eq!(sgw.in_flight_refreshes(&big), 1);
    assert_eq!(sgw.in_flight_refreshes(&small), 0);

    let events = sgw
        .wait_for_completion_events(3, Duration::from_secs(5))
        .await;
    assert!(t0.elapsed() >= Duration::from_millis(1700));
    assert_eq!(sgw.in_flight_refreshes(&big), 0);
    let by_id = |id: &str| {
        events
            .iter()
            .find(|e| e.notification_id == id)
            .cloned()
            .expect("completed")
    };
    let e_small = by_id(&r_small.notification_id);
    let e_big = by_id(&r_big.notification_id);
    let e_plain = by_id(&r_plain.notification_id);
    assert_eq!(completed_after_start(&e_small), Duration::from_millis(200));
    assert_eq!(completed_after_start(&e_plain), Duration::from_millis(200));
    assert_eq!(completed_after_start(&e_big), Duration::from_millis(1700));
    assert_eq!(
        events[2].notification_id, r_big.notification_id,
        "completes last"
    );
    assert_eq!(e_big.folder_list, vec!["/dir00000", "/"]);
    assert_eq!(e_big.started, r_big.started_at);
}

#[tokio::test]
async fn an_s3_refresh_is_timed_from_its_listing() {
    let (_moto, s3, bucket) = moto_bucket(&["a/1", "a/2", "a/3", "b/4"]).await;
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::ZERO);
    sgw.set_refresh_time_per_object(Duration::from_millis(100));
    let gw = sgw.add_gateway("gw");
    sgw.set_bucket_source(&bucket, BucketSource::S3(s3));
    let share = sgw.add_share(&gw, ShareKind::Nfs, &bucket_arn(&bucket));
    let sg = client_no_retry(&sgw).await;

    let record = refresh(&sgw, &sg, &share, &["/a"], false).await;
    assert_eq!(record.work.objects_listed, 3);
    // Not complete at the zero base: the listing decides.
    assert_eq!(sgw.in_flight_refreshes(&share), 1);
    let events = sgw
        .wait_for_completion_events(1, Duration::from_secs(5))
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        completed_after_start(&events[0]),
        Duration::from_millis(300)
    );
    assert_eq!(sgw.in_flight_refreshes(&share), 0);
}

#[tokio::test]
async fn strict_limits_reject_a_call_that_comes_too_soon() {
    let (sgw, sg, gw, a) = timed_standin(Duration::ZERO).await;
    let b = sgw.add_share(&gw, ShareKind::Smb, "arn:aws:s3:::other");
    // Off by default: back-to-back calls are accepted.
    try_refresh(&sg, &a).await.expect("1st");
    try_refresh(&sg, &a).await.expect("2nd, not strict");
    assert_eq!(sgw.interval_violations(), 0);

    sgw.set_strict_limits(Some(Duration::from_millis(600)));
    tokio::time::sleep(Duration::from_millis(650)).await;
    try_refresh(&sg, &a)
        .await
        .expect("600 ms after the last one");
    // Taken after the accepted call, so that t0 + 620 ms is surely 600 ms after it.
    let t0 = std::time::Instant::now();
    let too_soon = try_refresh(&sg, &a).await;
    match too_soon {
        Err(SdkError::ServiceError(e)) => {
            assert_eq!(e.raw().status().as_u16(), 400);
            match e.into_err() {
                RefreshCacheError::InvalidGatewayRequestException(e) => {
                    let message = e.message().unwrap_or_default();
                    assert!(
                        message.contains("after the previous accepted call")
                            && message.contains("0.600 s"),
                        "{message}"
                    );
                    assert_eq!(
                        error_code(e.error()),
                        Some("ServiceUnavailable".to_string())
                    );
                }
                other => panic!("expected InvalidGatewayRequestException, got {other:?}"),
            }
        }
        other => panic!("expected a service error, got {other:?}"),
    }
    assert_eq!(sgw.interval_violations(), 1);
    assert_eq!(sgw.rejected_refreshes(), 0, "not the in-flight limit");
    // Per share.
    try_refresh(&sg, &b).await.expect("another share");

    // The interval runs from the previous *accepted* call: a rejected one does not
    // restart it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is_busy(&try_refresh(&sg, &a).await));
    assert_eq!(sgw.interval_violations(), 2);
    let wait = Duration::from_millis(620).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait).await;
    try_refresh(&sg, &a)
        .await
        .expect("600 ms after the accepted call, 300 ms after the rejected one");
    assert_eq!(sgw.interval_violations(), 2);
    let calls = sgw.calls_to("RefreshCache");
    assert_eq!(calls, 7);
    assert_eq!(sgw.refreshes().len(), 5);

    // Off again.
    sgw.set_strict_limits(None);
    try_refresh(&sg, &a).await.expect("not strict");
    sgw.reset_calls();
    assert_eq!(sgw.interval_violations(), 0);
}

// ---- refresh-complete events through moto's EventBridge ----

/// An SQS queue in moto that a rule on `bus` (`None`: the default bus) fills with the
/// refresh-complete events of `shares` only (moto is shared by the tests). Returns the
/// queue URL and the rule, for [`remove_rule`].
async fn event_queue(
    moto: &Moto,
    clients: &Clients,
    bus: Option<&str>,
    shares: &[&str],
) -> (String, String) {
    let url = clients
        .create_queue(&unique_name("sgw-events"))
        .await
        .expect("queue");
    let arn = clients.queue_arn(&url).await.expect("queue arn");
    let rule = unique_name("RefreshCompleted");
    let call = |operation: &'static str, input: Value| async move {
        eventbridge_call(moto.endpoint(), "us-east-1", ACCOUNT_ID, operation, &input)
            .await
            .unwrap_or_else(|e| panic!("{operation}: {e}"))
    };
    if let Some(bus) = bus {
        call("CreateEventBus", json!({ "Name": bus })).await;
    }
    let pattern = json!({
        "source": [REFRESH_EVENT_SOURCE],
        "detail-type": [REFRESH_EVENT_DETAIL_TYPE],
        "resources": shares,
    });
    call(
        "PutRule",
        json!({"Name": rule, "EventBusName": bus, "EventPattern": pattern.to_string()}),
    )
    .await;
    call(
        "PutTargets",
        json!({"Rule": rule, "EventBusName": bus, "Targets": [{"Id": "q", "Arn": arn}]}),
    )
    .await;
    (url, rule)
}

async fn remove_rule(moto: &Moto, rule: &str, bus: Option<&str>) {
    for (operation, input) in [
        (
            "RemoveTargets",
            json!({"Rule": rule, "EventBusName": bus, "Ids": ["q"]}),
        ),
        ("DeleteRule", json!({"Name": rule, "EventBusName": bus})),
    ] {
        eventbridge_call(moto.endpoint(), "us-east-1", ACCOUNT_ID, operation, &input)
            .await
            .unwrap_or_else(|e| panic!("{operation}: {e}"));
    }
}

/// The bodies of the messages that arrive on `url` within `wait` (at least `expected`
/// of them, or all that came).
async fn event_bodies(clients: &Clients, url: &str, expected: usize, wait: Duration) -> Vec<Value> {
    let messages = clients.drain(url, expected, wait).await.expect("receive");
    for m in &messages {
        assert!(
            m.message_attributes().is_none_or(|a| a.is_empty()),
            "EventBridge sends no message attributes: {m:?}"
        );
    }
    messages
        .iter()
        .map(|m| serde_json::from_str(m.body().expect("a body")).expect("JSON body"))
        .collect()
}

fn is_event_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && s.ends_with('Z')
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

#[tokio::test]
async fn refresh_complete_events_reach_sqs_through_eventbridge_in_the_documented_shape() {
    let moto = Moto::start().await.expect("moto starts");
    let clients = Clients::new(&sdk_config(moto.endpoint()).await);
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::from_millis(150));
    sgw.set_completion_events(Some(CompletionEvents::to(moto.endpoint())));
    let gw = sgw.add_gateway("gw");
    let a = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::events-a");
    let b = sgw.add_share(&gw, ShareKind::Smb, "arn:aws:s3:::events-b/data/");
    // A gateway in another region puts its events on that region's bus.
    let gw_eu = sgw.add_gateway_in("eu-west-1", "gw-eu");
    let c = sgw.add_share(&gw_eu, ShareKind::Nfs, "arn:aws:s3:::events-c");
    // The default bus, as a real gateway uses; the rule only takes these shares' events.
    let (url, rule) = event_queue(&moto, &clients, None, &[&a, &b, &c]).await;

    let sg = client_no_retry(&sgw).await;
    let id_a = sg
        .refresh_cache()
        .file_share_arn(&a)
        .folder_list("/x")
        .folder_list("/y/z")
        .recursive(false)
        .send()
        .await
        .expect("refresh a")
        .notification_id()
        .expect("id")
        .to_string();
    let id_b = try_refresh(&sg, &b).await.expect("refresh b");
    let eu = Client::from_conf(
        sg.config()
            .to_builder()
            .region(Region::new("eu-west-1"))
            .build(),
    );
    let id_c = try_refresh(&eu, &c).await.expect("refresh c");
    assert_eq!(
        sgw.completion_events().len(),
        0,
        "no event before completion"
    );

    let records = sgw
        .wait_for_completion_events(3, Duration::from_secs(10))
        .await;
    assert_eq!(records.len(), 3);
    for record in &records {
        assert!(
            record.is_settled() && record.errors.is_empty(),
            "{record:?}"
        );
        assert_eq!(record.copies, 1);
        assert_eq!(record.event_ids.len(), 1);
    }
    let record_c = records
        .iter()
        .find(|r| r.notification_id == id_c)
        .expect("c completed");
    assert_eq!(record_c.region.as_deref(), Some("eu-west-1"));

    // Only a and b reach the us-east-1 queue; c went to eu-west-1, where no rule is.
    let bodies = event_bodies(&clients, &url, 3, Duration::from_secs(4)).await;
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    for (share, gateway, id, folders) in [
        (&a, &gw, &id_a, json!(["/x", "/y/z"])),
        (&b, &gw, &id_b, json!(["/"])),
    ] {
        let event = bodies
            .iter()
            .find(|e| e["detail"]["notification-id"] == json!(id))
            .unwrap_or_else(|| panic!("no event for {share}: {bodies:#?}"));
        let record = records
            .iter()
            .find(|r| &r.notification_id == id)
            .expect("recorded");
        assert_eq!(event["version"], "0");
        assert_eq!(event["id"], json!(record.event_ids[0]));
        assert_eq!(event["source"], "aws.storagegateway");
        assert_eq!(event["detail-type"], "Storage Gateway Refresh Cache Event");
        assert_eq!(event["region"], "us-east-1");
        // moto 5.2.1's SQS target leaves `account` out; AWS sends it.
        assert!(event.get("account").is_none_or(|v| v == ACCOUNT_ID));
        assert_eq!(event["resources"], json!([share, gateway]));
        let detail = &event["detail"];
        assert_eq!(detail["event-type"], "refresh-complete");
        assert_eq!(detail["folderList"], folders);
        let started = detail["started"].as_str().expect("started");
        let completed = detail["completed"].as_str().expect("completed");
        assert!(is_event_timestamp(started), "{started}");
        assert!(is_event_timestamp(completed), "{completed}");
        assert_eq!(started, rfc3339_millis(record.started));
        assert_eq!(completed, rfc3339_millis(record.completed));
        assert!(started < completed);
        // `time` is the completion, to the second.
        assert_eq!(event["time"].as_str().map(|t| t.len()), Some(20), "{event}");
        assert_eq!(
            event["time"].as_str().map(|t| &t[..19]),
            Some(&completed[..19])
        );
        assert_eq!(
            record.detail, *detail,
            "the record keeps the detail that was sent"
        );
    }
    remove_rule(&moto, &rule, None).await;
}

#[tokio::test]
async fn refresh_complete_events_can_be_dropped_and_duplicated() {
    let moto = Moto::start().await.expect("moto starts");
    let clients = Clients::new(&sdk_config(moto.endpoint()).await);
    let bus = unique_name("sgw-faults");
    let sgw = standin().await;
    sgw.set_refresh_duration(Duration::ZERO);
    sgw.set_completion_events(Some(CompletionEvents::to(moto.endpoint()).on_bus(&bus)));
    let gw = sgw.add_gateway("gw");
    let share = sgw.add_share(&gw, ShareKind::Nfs, "arn:aws:s3:::faults");
    let (url, rule) = event_queue(&moto, &clients, Some(&bus), &[&share]).await;
    let sg = client_no_retry(&sgw).await;

    sgw.drop_next_completion_events(1);
    sgw.duplicate_next_completion_events(1);
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(try_refresh(&sg, &share).await.expect("accepted"));
        let records = sgw
            .wait_for_completion_events(n, Duration::from_secs(10))
            .await;
        assert_eq!(records.len(), n);
    }
    let records = sgw.completion_events();
    let (dropped, doubled, plain) = (&records[0], &records[1], &records[2]);
    assert_eq!(
        records
            .iter()
            .map(|r| r.notification_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    assert!(dropped.dropped);
    assert_eq!((dropped.copies, dropped.event_ids.len()), (0, 0));
    assert!(!doubled.dropped);
    assert_eq!((doubled.copies, doubled.event_ids.len()), (2, 2));
    assert_ne!(doubled.event_ids[0], doubled.event_ids[1]);
    assert_eq!((plain.copies, plain.event_ids.len()), (1, 1));
    assert!(records
        .iter()
        .all(|r| r.errors.is_empty() && r.is_settled()));

    // Three messages on the queue: none for the dropped event, two for the doubled one.
    let bodies = event_bodies(&clients, &url, 4, Duration::from_secs(4)).await;
    assert_eq!(bodies.len(), 3, "{bodies:#?}");
    let count = |id: &str| {
        bodies
            .iter()
            .filter(|e| e["detail"]["notification-id"] == json!(id))
            .count()
    };
    assert_eq!((count(&ids[0]), count(&ids[1]), count(&ids[2])), (0, 2, 1));
    let copies: Vec<&Value> = bodies
        .iter()
        .filter(|e| e["detail"]["notification-id"] == json!(ids[1]))
        .collect();
    assert_eq!(copies[0]["detail"], copies[1]["detail"], "same event twice");
    assert_ne!(copies[0]["id"], copies[1]["id"]);

    // Events off again: completions are still recorded, nothing is sent.
    sgw.set_completion_events(None);
    try_refresh(&sg, &share).await.expect("accepted");
    let records = sgw
        .wait_for_completion_events(4, Duration::from_secs(5))
        .await;
    assert_eq!(records.len(), 4);
    assert_eq!((records[3].region.as_deref(), records[3].copies), (None, 0));
    assert!(event_bodies(&clients, &url, 1, Duration::from_secs(2))
        .await
        .is_empty());
    remove_rule(&moto, &rule, Some(&bus)).await;
}
