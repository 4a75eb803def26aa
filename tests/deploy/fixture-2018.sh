#!/usr/bin/env bash
# Recreates a deployment of the 2018 design with the AWS CLI, command by command as
# its blog post and its create-stack.sh give them (docs/takeover-2018.md describes
# that deployment): the table, the queue, the four policies and two roles, the two
# Python functions with a reserved concurrency of 1, the aggregator's permission
# SID_<bucket> and the notification configuration with the one entry
# s3-event-aggregator for each BUCKET (written whole, as event.json was), and the
# refresher's event source mapping. The 2018 policy documents are inlined here, as
# the post shows them, with REGION and ACCOUNT_ID filled in.
#
# It also puts one item per bucket into the table, in the 2018 shape (BucketName,
# timestamp, share), as the 2018 functions left them.
#
# usage: tests/deploy/fixture-2018.sh BUCKET...
# The buckets must exist. The region is AWS_DEFAULT_REGION; AWS_ENDPOINT_URL (moto)
# is passed to every call. The function code is a stub (moto never runs it).
# Test code: python3 builds the zip files.
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: tests/deploy/fixture-2018.sh BUCKET..." >&2; exit 2; }
REGION=${AWS_DEFAULT_REGION:?set AWS_DEFAULT_REGION}
awsf() {
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    aws --endpoint-url "$AWS_ENDPOINT_URL" --region "$REGION" "$@"
  else
    aws --region "$REGION" "$@"
  fi
}
say() { printf '    2018: %s\n' "$*"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fixture-2018.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ACCOUNT_ID=$(awsf sts get-caller-identity --query Account --output text)

say "table S3EventAggregator (provisioned 1 RCU, 5 WCU), queue S3EventAggregatorActionQueue"
awsf dynamodb create-table --table-name S3EventAggregator \
  --attribute-definitions AttributeName=BucketName,AttributeType=S \
  --key-schema AttributeName=BucketName,KeyType=HASH \
  --provisioned-throughput ReadCapacityUnits=1,WriteCapacityUnits=5 >/dev/null
awsf dynamodb wait table-exists --table-name S3EventAggregator
awsf sqs create-queue --queue-name S3EventAggregatorActionQueue >/dev/null

say "policies S3EventAggregatorDynamo, S3EventAggregatorSqsWriter; role S3EventAggregatorLambdaRole"
cat >"$WORK/dynamo-writer.json" <<EOF
{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
   "dynamodb:UpdateItem",
   "dynamodb:GetItem"
   ],
            "Resource": "arn:aws:dynamodb:$REGION:$ACCOUNT_ID:table/S3EventAggregator"
        }
    ]
}
EOF
awsf iam create-policy --policy-name S3EventAggregatorDynamo --policy-document "file://$WORK/dynamo-writer.json" >/dev/null
cat >"$WORK/sqs-writer.json" <<EOF
{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "sqs:SendMessage",
            "Resource": "arn:aws:sqs:$REGION:$ACCOUNT_ID:S3EventAggregatorActionQueue"
        }
    ]
}
EOF
awsf iam create-policy --policy-name S3EventAggregatorSqsWriter --policy-document "file://$WORK/sqs-writer.json" >/dev/null
cat >"$WORK/lambda-trust.json" <<'EOF'
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Principal": {
        "Service": "lambda.amazonaws.com"
      },
      "Action": "sts:AssumeRole"
    }
  ]
}
EOF
awsf iam create-role --role-name S3EventAggregatorLambdaRole --assume-role-policy-document "file://$WORK/lambda-trust.json" >/dev/null
awsf iam attach-role-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/S3EventAggregatorDynamo" --role-name S3EventAggregatorLambdaRole
awsf iam attach-role-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/S3EventAggregatorSqsWriter" --role-name S3EventAggregatorLambdaRole
# moto knows the AWS managed policies only when started with
# MOTO_IAM_LOAD_MANAGED_POLICIES=true (tests/deploy/test-deploy.sh does that).
awsf iam attach-role-policy --policy-arn arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole --role-name S3EventAggregatorLambdaRole

# zip_stub FILE MODULE: a deployment package with a stub handler module.
zip_stub() {
  python3 -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr(sys.argv[2] + ".py", "def lambda_handler(event, context):\n    pass\n")' "$1" "$2"
}

say "function S3EventAggregator (python3.6, reserved concurrency 1)"
zip_stub "$WORK/aggregator.zip" s3_aggregator
awsf lambda create-function --function-name S3EventAggregator --runtime python3.6 \
  --role "arn:aws:iam::$ACCOUNT_ID:role/S3EventAggregatorLambdaRole" --zip-file "fileb://$WORK/aggregator.zip" \
  --handler s3_aggregator.lambda_handler --timeout 10 \
  --environment "Variables={QUEUE_URL=https://sqs.$REGION.amazonaws.com/$ACCOUNT_ID/S3EventAggregatorActionQueue,REFRESH_DELAY_SECONDS=30,LOG_LEVEL=INFO}" >/dev/null
awsf lambda put-function-concurrency --function-name S3EventAggregator --reserved-concurrent-executions 1 >/dev/null
# Lambda creates the log group at the first invocation; a deployment that ran has it.
awsf logs create-log-group --log-group-name /aws/lambda/S3EventAggregator

for BUCKET in "$@"; do
  say "bucket $BUCKET: permission SID_$BUCKET, notification configuration (event.json), a 2018 item"
  awsf lambda add-permission --function-name S3EventAggregator --statement-id "SID_$BUCKET" \
    --action lambda:InvokeFunction --principal s3.amazonaws.com --source-account "$ACCOUNT_ID" \
    --source-arn "arn:aws:s3:::$BUCKET" >/dev/null
  cat >"$WORK/event.json" <<EOF
{
    "LambdaFunctionConfigurations": [
        {
            "Id": "s3-event-aggregator",
            "LambdaFunctionArn": "arn:aws:lambda:$REGION:$ACCOUNT_ID:function:S3EventAggregator",
            "Events": [
                "s3:ObjectCreated:*",
                "s3:ObjectRemoved:*"
            ]
        }
    ]
}
EOF
  awsf s3api put-bucket-notification-configuration --bucket "$BUCKET" --notification-configuration "file://$WORK/event.json"
  awsf dynamodb put-item --table-name S3EventAggregator --item \
    "{\"BucketName\": {\"S\": \"$BUCKET\"}, \"timestamp\": {\"N\": \"1534097642149\"}, \"share\": {\"S\": \"arn:aws:storagegateway:$REGION:$ACCOUNT_ID:share/share-2018ABCD\"}}"
done

say "policies StorageGatewayRefreshPolicy, S3EventAggregatorSqsReader; role S3AggregatorActionLambdaRole"
cat >"$WORK/sgw-refresh.json" <<'EOF'
{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "storagegateway:RefreshCache",
                "storagegateway:ListFileShares",
                "storagegateway:DescribeNFSFileShares",
                "storagegateway:DescribeSMBFileShares"
            ],
            "Resource": "*"
        }
    ]
}
EOF
awsf iam create-policy --policy-name StorageGatewayRefreshPolicy --policy-document "file://$WORK/sgw-refresh.json" >/dev/null
cat >"$WORK/sqs-reader.json" <<EOF
{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:ReceiveMessage"
            ],
            "Resource": "arn:aws:sqs:$REGION:$ACCOUNT_ID:S3EventAggregatorActionQueue"
        }
    ]
}
EOF
awsf iam create-policy --policy-name S3EventAggregatorSqsReader --policy-document "file://$WORK/sqs-reader.json" >/dev/null
awsf iam create-role --role-name S3AggregatorActionLambdaRole --assume-role-policy-document "file://$WORK/lambda-trust.json" >/dev/null
awsf iam attach-role-policy --policy-arn arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole --role-name S3AggregatorActionLambdaRole
awsf iam attach-role-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/S3EventAggregatorSqsReader" --role-name S3AggregatorActionLambdaRole
awsf iam attach-role-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/S3EventAggregatorDynamo" --role-name S3AggregatorActionLambdaRole
awsf iam attach-role-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/StorageGatewayRefreshPolicy" --role-name S3AggregatorActionLambdaRole

say "function S3StorageGatewayRefresh (python3.6, reserved concurrency 1) and its event source mapping"
zip_stub "$WORK/refresh.zip" s3_sgw_refresh
awsf lambda create-function --function-name S3StorageGatewayRefresh --runtime python3.6 \
  --role "arn:aws:iam::$ACCOUNT_ID:role/S3AggregatorActionLambdaRole" --zip-file "fileb://$WORK/refresh.zip" \
  --handler s3_sgw_refresh.lambda_handler --timeout 5 --environment "Variables={LOG_LEVEL=INFO}" >/dev/null
awsf lambda put-function-concurrency --function-name S3StorageGatewayRefresh --reserved-concurrent-executions 1 >/dev/null
awsf logs create-log-group --log-group-name /aws/lambda/S3StorageGatewayRefresh
awsf lambda create-event-source-mapping --function-name S3StorageGatewayRefresh \
  --event-source "arn:aws:sqs:$REGION:$ACCOUNT_ID:S3EventAggregatorActionQueue" --batch-size 1 >/dev/null
say "done"
