//! The Storage Gateway adapter, in its own feature (`storagegateway`) so that only the
//! refresher links the Storage Gateway SDK.

use super::regional::RegionalGateways;
use super::sdk::{classify, describe};
use crate::error::GatewayError;
use crate::ports::{DescribedShare, FileGateway, SharePage, ShareSummary};
use crate::shares::{RefreshPlan, ShareKind};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_storagegateway::types::FileShareType;
use std::fmt::Debug;

/// Storage Gateway through its SDK client.
#[derive(Debug, Clone)]
pub struct SdkFileGateway {
    client: aws_sdk_storagegateway::Client,
}

impl SdkFileGateway {
    pub fn new(client: aws_sdk_storagegateway::Client) -> Self {
        SdkFileGateway { client }
    }
}

fn gateway_error<E, R>(err: SdkError<E, R>, share_arn: Option<&str>) -> GatewayError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: Debug + 'static,
{
    let message = describe(&err);
    if let SdkError::ServiceError(ctx) = &err {
        let e = ctx.err();
        if e.code() == Some("InvalidGatewayRequestException") {
            // The gateway says InvalidGatewayRequestException both for a share that is
            // gone and for "two refreshes already in flight"; only the text tells them apart.
            let text = e.message().unwrap_or_default().to_ascii_lowercase();
            if let Some(arn) = share_arn {
                if text.contains("not found")
                    || text.contains("does not exist")
                    || text.contains("no such")
                {
                    return GatewayError::ShareNotFound {
                        share_arn: arn.to_string(),
                        message,
                    };
                }
            }
            return GatewayError::Busy { message };
        }
    }
    GatewayError::Other {
        retry: classify(&err),
        message,
    }
}

impl FileGateway for SdkFileGateway {
    async fn list_file_shares(&self, marker: Option<&str>) -> Result<SharePage, GatewayError> {
        let out = self
            .client
            .list_file_shares()
            .set_marker(marker.map(str::to_string))
            .send()
            .await
            .map_err(|e| gateway_error(e, None))?;
        let shares = out
            .file_share_info_list()
            .iter()
            .filter_map(|info| {
                let kind = match info.file_share_type()? {
                    FileShareType::Nfs => ShareKind::Nfs,
                    FileShareType::Smb => ShareKind::Smb,
                    // A share type this build does not know cannot be described.
                    _ => return None,
                };
                Some(ShareSummary {
                    arn: info.file_share_arn()?.to_string(),
                    kind,
                })
            })
            .collect();
        Ok(SharePage {
            shares,
            next_marker: out
                .next_marker()
                .filter(|m| !m.is_empty())
                .map(str::to_string),
        })
    }

    async fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> Result<Vec<DescribedShare>, GatewayError> {
        let first = arns.first().map(String::as_str);
        let described = |arn: Option<&str>, gateway: Option<&str>, location: Option<&str>| {
            Some(DescribedShare {
                arn: arn?.to_string(),
                kind,
                gateway_arn: gateway.unwrap_or_default().to_string(),
                location_arn: location?.to_string(),
            })
        };
        match kind {
            ShareKind::Nfs => {
                let out = self
                    .client
                    .describe_nfs_file_shares()
                    .set_file_share_arn_list(Some(arns.to_vec()))
                    .send()
                    .await
                    .map_err(|e| gateway_error(e, first))?;
                Ok(out
                    .nfs_file_share_info_list()
                    .iter()
                    .filter_map(|s| {
                        described(s.file_share_arn(), s.gateway_arn(), s.location_arn())
                    })
                    .collect())
            }
            ShareKind::Smb => {
                let out = self
                    .client
                    .describe_smb_file_shares()
                    .set_file_share_arn_list(Some(arns.to_vec()))
                    .send()
                    .await
                    .map_err(|e| gateway_error(e, first))?;
                Ok(out
                    .smb_file_share_info_list()
                    .iter()
                    .filter_map(|s| {
                        described(s.file_share_arn(), s.gateway_arn(), s.location_arn())
                    })
                    .collect())
            }
        }
    }

    async fn refresh_cache(&self, plan: &RefreshPlan) -> Result<String, GatewayError> {
        let out = self
            .client
            .refresh_cache()
            .file_share_arn(&plan.share_arn)
            .set_folder_list(Some(plan.folders.clone()))
            .recursive(plan.recursive)
            // One attempt: a failed call is retried by the share's own back-off (one
            // call per step), not by the SDK three times per message.
            .customize()
            .config_override(
                aws_sdk_storagegateway::config::Config::builder().retry_config(
                    aws_sdk_storagegateway::config::retry::RetryConfig::standard()
                        .with_max_attempts(1),
                ),
            )
            .send()
            .await
            .map_err(|e| gateway_error(e, Some(&plan.share_arn)))?;
        Ok(out.notification_id().unwrap_or_default().to_string())
    }
}

impl SdkFileGateway {
    pub fn from_config(config: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_storagegateway::Client::new(config))
    }

    /// One client per region of `regions` (`GATEWAY_REGIONS`), each built from
    /// `config` with only its region changed: the credentials, retry settings and
    /// endpoint (`AWS_ENDPOINT_URL_STORAGE_GATEWAY`) stay as `config` has them.
    pub fn for_regions(
        config: &aws_config::SdkConfig,
        regions: &[String],
    ) -> RegionalGateways<SdkFileGateway> {
        RegionalGateways::new(regions.iter().map(|region| {
            let client_config = aws_sdk_storagegateway::config::Builder::from(config)
                .region(aws_config::Region::new(region.clone()))
                .build();
            (
                region.clone(),
                Self::new(aws_sdk_storagegateway::Client::from_conf(client_config)),
            )
        }))
    }
}
