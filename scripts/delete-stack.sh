#!/usr/bin/env bash
# Deletes everything that create-stack.sh made, including our entry in the
# notification configuration of every attached bucket. Safe to run again.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"
# shellcheck source=scripts/lib/monitoring.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/monitoring.sh"
# shellcheck source=scripts/lib/completion.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/completion.sh"
# shellcheck source=scripts/lib/takeover.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/takeover.sh"

USAGE="usage: scripts/delete-stack.sh [--prefix NAME] [--region REGION] [BUCKET...]"

help() {
  cat <<EOF
$USAGE

Deletes the stack, whatever its ingest mode: first detaches every attached bucket
(the buckets named in the aggregator's permissions, in the ingest queue's policy and
in the EventBridge rule's pattern, plus any BUCKET given) as detach-bucket.sh does,
then the event source mappings, the EventBridge rules <prefix>S3Events and
<prefix>RefreshCompleted, the rules <prefix>RefreshCompleted that forward the
refresh-complete events of the other gateway regions (in each region of the
refresher's GATEWAY_REGIONS and of the tag s3ea:forwarding-regions of the role
<prefix>EventsForwarder) and that role, both functions,
their log groups, the IAM roles and policies, the SQS queues (action queue and DLQ,
aggregator DLQ, ingest queue and DLQ), the DynamoDB table, the CloudWatch alarms
<prefix>-<Name> and the CloudWatch dashboard <prefix>. Every other
notification entry of the buckets stays as it is, and the buckets themselves are not
touched. What is already gone is skipped, so a second run succeeds.

With the default prefix, it also removes what is left of a deployment of the 2018
scripts (docs/takeover-2018.md): the entries s3-event-aggregator on
the buckets that its permissions SID_<bucket> name and on every BUCKET given, the
function S3StorageGatewayRefresh with its mapping and log group, the roles
S3EventAggregatorLambdaRole and S3AggregatorActionLambdaRole and the policies
S3EventAggregatorDynamo, S3EventAggregatorSqsWriter, S3EventAggregatorSqsReader and
StorageGatewayRefreshPolicy. (Its function, table and queue have the names of ours.)

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

# The 2018 deployment shares its function, table and queue names with the default
# prefix only; with another prefix, it is not this stack's.
LEGACY_FOUND=false LEGACY_MAPPINGS=
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then
  step "Looking for what is left of a deployment of the 2018 scripts"
  find_legacy ${BUCKETS[@]+"${BUCKETS[@]}"}
  if $LEGACY_FOUND; then
    print_legacy delete ": deleting it with the stack"
    # shellcheck disable=SC2034 # read by scripts/lib/stack.sh (ensure_notifications)
    DROP_LEGACY_ENTRY=true
    BUCKETS+=(${LEGACY_BUCKETS[@]+"${LEGACY_BUCKETS[@]}"})
  else
    info "none found"
  fi
fi
if [ "${#BUCKETS[@]}" -eq 0 ]; then
  step "Buckets: none attached"
else
  for bucket in $(printf '%s\n' "${BUCKETS[@]}" | sort -u); do detach_bucket "$bucket"; done
fi

# ---------------------------------------------------------------------------------
# Lambda

step "Event source mappings of $REFRESHER_FUNCTION and $AGGREGATOR_FUNCTION${LEGACY_MAPPINGS:+ (and of the 2018 $LEGACY_REFRESHER)}"
# All the region's mappings, filtered here: this also finds a mapping that outlived
# its function. A mapping that is being deleted already is left alone.
uuids=$(aws_cli lambda list-event-source-mappings \
  --query "EventSourceMappings[?(FunctionArn == '$REFRESHER_ARN' || FunctionArn == '$AGGREGATOR_ARN') && State != 'Deleting'].UUID" --output text)
[ "$uuids" != None ] || uuids=
uuids="$uuids${LEGACY_MAPPINGS:+ $LEGACY_MAPPINGS}"
if [ -z "$uuids" ]; then info "none"; fi
for uuid in $uuids; do
  info "deleting $uuid"
  aws_maybe 'ResourceNotFoundException' lambda delete-event-source-mapping --uuid "$uuid" || info "already gone"
done

delete_rule "$EVENT_RULE"
delete_rule "$COMPLETION_RULE"
# The forwarding rules of the other gateway regions (scripts/lib/completion.sh), found
# from the refresher's GATEWAY_REGIONS, so before the function goes, and from the
# forwarder role's tag; then the role.
load_function_gateway_regions
delete_completion_forwarding "$FUNCTION_GATEWAY_REGIONS"

functions=("$AGGREGATOR_FUNCTION" "$REFRESHER_FUNCTION")
# With the default prefix, the 2018 refresh function and its log group too.
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then functions+=("$LEGACY_REFRESHER"); fi
for function in "${functions[@]}"; do
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
# IAM (delete_policy and delete_role: scripts/lib/stack.sh).

delete_policy "$AGGREGATOR_POLICY_ARN"
delete_policy "$INGEST_POLICY_ARN"
delete_policy "$REFRESHER_POLICY_ARN"
delete_role "$AGGREGATOR_ROLE"
delete_role "$REFRESHER_ROLE"
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then
  # What is left of a 2018 deployment (each step says "absent" when there is nothing).
  for name in "${LEGACY_POLICIES[@]}"; do delete_policy "arn:aws:iam::$ACCOUNT_ID:policy/$name"; done
  for name in "${LEGACY_ROLES[@]}"; do delete_role "$name"; done
fi

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
