//! The S3 Control adapter (access points), in the `storagegateway` feature with the
//! Storage Gateway adapter: only the refresher links it.
//!
//! S3 Control is regional and takes the account in every call. One client serves
//! every region: each call overrides the client's region with the access point's, so
//! that it goes to that region's endpoint and is signed for it. The SDK sends the
//! account as `x-amz-account-id` and in the host name (`{AccountId}.s3-control.…`;
//! with an endpoint URL, `{AccountId}.{authority}`).

use super::sdk::{classify, describe};
use crate::error::{AccessPointError, Retry};
use crate::ports::{AccessPoint, AccessPoints};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3control::config::http::HttpResponse;
use aws_sdk_s3control::config::Region;
use std::collections::BTreeSet;

/// The error code of `GetAccessPoint` for an access point that does not exist.
const NO_SUCH_ACCESS_POINT: &str = "NoSuchAccessPoint";
/// A guard against an endpoint that pages forever.
const MAX_LIST_PAGES: usize = 10_000;

/// S3 Control through its SDK client.
#[derive(Debug, Clone)]
pub struct SdkAccessPoints {
    client: aws_sdk_s3control::Client,
    page_size: Option<i32>,
}

impl SdkAccessPoints {
    pub fn new(client: aws_sdk_s3control::Client) -> Self {
        SdkAccessPoints {
            client,
            page_size: None,
        }
    }

    pub fn from_config(config: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_s3control::Client::new(config))
    }

    /// `MaxResults` of each `ListAccessPoints` page (default: the service's, 1000).
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = Some(page_size.max(1));
        self
    }
}

/// The client's configuration for one call in `region`.
fn in_region(region: &str) -> aws_sdk_s3control::config::Builder {
    aws_sdk_s3control::config::Builder::default().region(Region::new(region.to_string()))
}

/// S3's own "try again" codes, which the shared classification does not know.
const S3_RETRYABLE_CODES: &[&str] = &["SlowDown", "RequestTimeout", "TooManyRequestsException"];

/// As [`classify`], and S3's throttling codes and any 5xx answer are worth retrying too.
fn retry_of<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Retry {
    if let SdkError::ServiceError(ctx) = err {
        if ctx.raw().status().is_server_error()
            || S3_RETRYABLE_CODES.contains(&ctx.err().code().unwrap_or_default())
        {
            return Retry::Later;
        }
    }
    classify(err)
}

fn access_point_error<E>(err: &SdkError<E, HttpResponse>, call: &str) -> AccessPointError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    AccessPointError {
        retry: retry_of(err),
        message: format!("{call}: {}", describe(err)),
    }
}

fn is_not_found<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::ServiceError(ctx) if ctx.err().code() == Some(NO_SUCH_ACCESS_POINT))
}

impl AccessPoints for SdkAccessPoints {
    async fn get_access_point(
        &self,
        account: &str,
        region: &str,
        name: &str,
    ) -> Result<Option<AccessPoint>, AccessPointError> {
        let call = format!("GetAccessPoint {name} in {account}/{region}");
        let out = match self
            .client
            .get_access_point()
            .account_id(account)
            .name(name)
            .customize()
            .config_override(in_region(region))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(access_point_error(&e, &call)),
        };
        // An answer without a bucket maps nothing; it is never guessed.
        let bucket = out
            .bucket()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| AccessPointError {
                retry: Retry::Never,
                message: format!("{call}: the answer names no bucket"),
            })?;
        Ok(Some(AccessPoint {
            name: out.name().unwrap_or(name).to_string(),
            alias: out.alias().unwrap_or_default().to_string(),
            bucket: bucket.to_string(),
        }))
    }

    async fn list_access_points(
        &self,
        account: &str,
        region: &str,
    ) -> Result<Vec<AccessPoint>, AccessPointError> {
        let call = format!("ListAccessPoints in {account}/{region}");
        let mut points = Vec::new();
        let mut token: Option<String> = None;
        let mut seen_tokens = BTreeSet::new();
        for _ in 0..MAX_LIST_PAGES {
            let out = self
                .client
                .list_access_points()
                .account_id(account)
                .set_max_results(self.page_size)
                .set_next_token(token.clone())
                .customize()
                .config_override(in_region(region))
                .send()
                .await
                .map_err(|e| access_point_error(&e, &call))?;
            points.extend(
                out.access_point_list()
                    .iter()
                    // An entry without a bucket maps nothing.
                    .filter(|p| !p.bucket().is_empty())
                    .map(|p| AccessPoint {
                        name: p.name().to_string(),
                        alias: p.alias().unwrap_or_default().to_string(),
                        bucket: p.bucket().to_string(),
                    }),
            );
            match out.next_token().filter(|t| !t.is_empty()) {
                None => return Ok(points),
                Some(next) if seen_tokens.insert(next.to_string()) => {
                    token = Some(next.to_string())
                }
                Some(repeated) => {
                    return Err(AccessPointError {
                        retry: Retry::Later,
                        message: format!("{call}: NextToken {repeated:?} came twice"),
                    })
                }
            }
        }
        Err(AccessPointError {
            retry: Retry::Later,
            message: format!("{call}: more than {MAX_LIST_PAGES} pages"),
        })
    }
}
