#!/usr/bin/env bash
# Deletes everything that create-stack.sh made, including our entry in the
# notification configuration of every attached bucket. Safe to run again.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"
# shellcheck source=scripts/lib/monitoring.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/monitoring.sh"

USAGE="usage: scripts/delete-stack.sh [--prefix NAME] [--region REGION] [BUCKET...]"

help() {
  cat <<EOF
$USAGE

Deletes the stack, whatever its ingest mode: first detaches every attached bucket
(the buckets named in the aggregator's permissions, in the ingest queue's policy and
in the EventBridge rule's pattern, plus any BUCKET given) as detach-bucket.sh does,
then the event source mappings, the EventBridge rule <prefix>S3Events, both functions,
their log groups, the IAM roles and policies, the SQS queues (action queue and DLQ,
aggregator DLQ, ingest queue and DLQ), the DynamoDB table, the CloudWatch alarms
<prefix>-<Name> and the CloudWatch dashboard <prefix>. Every other
notification entry of the buckets stays as it is, and the buckets themselves are not
touched. What is already gone is skipped, so a second run succeeds.

Give a BUCKET when our entry may be on a bucket whose permission was removed by hand.

Options:
  --prefix NAME     name prefix of the stack [S3EA_PREFIX] (default $DEFAULT_PREFIX)
  --region REGION   AWS region [AWS_REGION, AWS_DEFAULT_REGION, then the CLI config]
  -h, --help        this help
EOF
}

PREFIX_ARG=${S3EA_PREFIX:-$DEFAULT_PREFIX}
REGION_FLAG=
BUCKETS=()
need_value() { [ "$1" -ge 2 ] || usage_error "$2 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --prefix) need_value $# "$1"; PREFIX_ARG=$2; shift 2 ;;
    --prefix=*) PREFIX_ARG=${1#*=}; shift ;;
    --region) need_value $# "$1"; REGION_FLAG=$2; shift 2 ;;
    --region=*) REGION_FLAG=${1#*=}; shift ;;
    --) shift; BUCKETS+=("$@"); break ;;
    -*) usage_error "unknown option $1" ;;
    *) BUCKETS+=("$1"); shift ;;
  esac
done
check_prefix "$PREFIX_ARG"
for bucket in "${BUCKETS[@]}"; do check_bucket "$bucket"; done
set_names "$PREFIX_ARG"
command -v aws >/dev/null 2>&1 || die "the AWS CLI is not installed (pip install awscli)"
resolve_target "$REGION_FLAG"

# ---------------------------------------------------------------------------------
# Buckets: the ones the grants name (the aggregator's permissions, the ingest queue's
# policy, the rule's pattern), and the ones given.

load_all_attached_buckets
BUCKETS+=(${ALL_BUCKETS[@]+"${ALL_BUCKETS[@]}"})
if [ "${#BUCKETS[@]}" -eq 0 ]; then
  step "Buckets: none attached"
else
  for bucket in $(printf '%s\n' "${BUCKETS[@]}" | sort -u); do detach_bucket "$bucket"; done
fi

# ---------------------------------------------------------------------------------
# Lambda

step "Event source mappings of $REFRESHER_FUNCTION and $AGGREGATOR_FUNCTION"
# All the region's mappings, filtered here: this also finds a mapping that outlived
# its function. A mapping that is being deleted already is left alone.
uuids=$(aws_cli lambda list-event-source-mappings \
  --query "EventSourceMappings[?(FunctionArn == '$REFRESHER_ARN' || FunctionArn == '$AGGREGATOR_ARN') && State != 'Deleting'].UUID" --output text)
[ "$uuids" != None ] || uuids=
if [ -z "$uuids" ]; then info "none"; fi
for uuid in $uuids; do
  info "deleting $uuid"
  aws_maybe 'ResourceNotFoundException' lambda delete-event-source-mapping --uuid "$uuid" || info "already gone"
done

step "EventBridge rule $EVENT_RULE"
if rule_exists; then
  targets=$(aws_cli events list-targets-by-rule --rule "$EVENT_RULE" --query 'Targets[].Id' --output text)
  [ "$targets" != None ] || targets=
  if [ -n "$targets" ]; then
    info "removing its targets: $targets"
    # shellcheck disable=SC2086 # one argument per target id
    aws_cli events remove-targets --rule "$EVENT_RULE" --ids $targets >/dev/null
  fi
  aws_cli events delete-rule --name "$EVENT_RULE"
  info "deleted (with its tags)"
else
  info "absent"
fi

for function in "$AGGREGATOR_FUNCTION" "$REFRESHER_FUNCTION"; do
  step "Lambda function $function (with its permissions, concurrency and invoke configuration)"
  if aws_maybe 'ResourceNotFoundException' lambda delete-function --function-name "$function"; then
    info "deleted"
  else
    info "absent"
  fi
  step "Log group /aws/lambda/$function"
  if aws_maybe 'ResourceNotFoundException' logs delete-log-group --log-group-name "/aws/lambda/$function"; then
    info "deleted"
  else
    info "absent"
  fi
done

# ---------------------------------------------------------------------------------
# IAM: detach our policies from every entity, drop their old versions, delete them;
# then the roles, once nothing is attached to them.

delete_policy() {
  local arn=$1 name entity version
  step "IAM policy ${arn##*/}"
  if ! aws_maybe 'NoSuchEntity' iam get-policy --policy-arn "$arn" --query Policy.Arn --output text; then
    info "absent"
    return
  fi
  for name in $(aws_cli iam list-entities-for-policy --policy-arn "$arn" --query 'PolicyRoles[].RoleName' --output text); do
    [ "$name" != None ] || continue
    info "detaching from role $name"
    aws_cli iam detach-role-policy --role-name "$name" --policy-arn "$arn"
  done
  for entity in $(aws_cli iam list-entities-for-policy --policy-arn "$arn" --query 'PolicyUsers[].UserName' --output text); do
    [ "$entity" != None ] || continue
    info "detaching from user $entity"
    aws_cli iam detach-user-policy --user-name "$entity" --policy-arn "$arn"
  done
  for entity in $(aws_cli iam list-entities-for-policy --policy-arn "$arn" --query 'PolicyGroups[].GroupName' --output text); do
    [ "$entity" != None ] || continue
    info "detaching from group $entity"
    aws_cli iam detach-group-policy --group-name "$entity" --policy-arn "$arn"
  done
  # shellcheck disable=SC2016 # JMESPath literals
  for version in $(aws_cli iam list-policy-versions --policy-arn "$arn" \
    --query 'Versions[?IsDefaultVersion == `false`].VersionId' --output text); do
    [ "$version" != None ] || continue
    info "deleting version $version"
    aws_cli iam delete-policy-version --policy-arn "$arn" --version-id "$version"
  done
  aws_cli iam delete-policy --policy-arn "$arn"
  info "deleted"
}

delete_role() {
  local role=$1 arn name
  step "IAM role $role"
  if ! aws_maybe 'NoSuchEntity' iam get-role --role-name "$role" --query Role.Arn --output text; then
    info "absent"
    return
  fi
  for arn in $(aws_cli iam list-attached-role-policies --role-name "$role" --query 'AttachedPolicies[].PolicyArn' --output text); do
    [ "$arn" != None ] || continue
    info "detaching $arn"
    aws_cli iam detach-role-policy --role-name "$role" --policy-arn "$arn"
  done
  for name in $(aws_cli iam list-role-policies --role-name "$role" --query 'PolicyNames[]' --output text); do
    [ "$name" != None ] || continue
    info "deleting inline policy $name"
    aws_cli iam delete-role-policy --role-name "$role" --policy-name "$name"
  done
  aws_cli iam delete-role --role-name "$role"
  info "deleted"
}

delete_policy "$AGGREGATOR_POLICY_ARN"
delete_policy "$INGEST_POLICY_ARN"
delete_policy "$REFRESHER_POLICY_ARN"
delete_role "$AGGREGATOR_ROLE"
delete_role "$REFRESHER_ROLE"

# ---------------------------------------------------------------------------------
# SQS and DynamoDB

for queue in "$ACTION_QUEUE" "$ACTION_DLQ" "$AGGREGATOR_DLQ" "$INGEST_QUEUE" "$INGEST_DLQ"; do
  step "SQS queue $queue"
  if aws_maybe 'NonExistentQueue|QueueDoesNotExist' sqs get-queue-url --queue-name "$queue" --query QueueUrl --output text; then
    aws_cli sqs delete-queue --queue-url "$AWS_OUT"
    info "deleted"
  else
    info "absent"
  fi
done

step "DynamoDB table $TABLE_NAME"
if aws_maybe 'ResourceNotFoundException' dynamodb delete-table --table-name "$TABLE_NAME" --query TableDescription.TableName --output text; then
  aws_cli dynamodb wait table-not-exists --table-name "$TABLE_NAME"
  info "deleted"
else
  info "absent"
fi

# ---------------------------------------------------------------------------------
# CloudWatch (scripts/lib/monitoring.sh)

delete_alarms
delete_dashboard

step "Done: the stack $PREFIX is deleted from account $ACCOUNT_ID, region $REGION"
