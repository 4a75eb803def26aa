# shellcheck shell=bash
# shellcheck disable=SC2034 # the names and ARNs set here are used by the scripts that source this
# Shared by scripts/create-stack.sh, attach-bucket.sh, detach-bucket.sh and
# delete-stack.sh (sourced, not run). It holds the resource names, the AWS CLI wrapper,
# region and account discovery, and the two per-bucket operations (the Lambda
# permission and our entry in the bucket's notification configuration).
#
# Only the aws CLI and POSIX tools are used here. JSON is handled with the CLI's own
# --query (JMESPath) and with text tools on documents whose shape we control.

S3EA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEFAULT_PREFIX=S3EventAggregator
# The events that reach the aggregator: every object creation and removal.
S3_EVENTS='["s3:ObjectCreated:*","s3:ObjectRemoved:*"]'

# AWS CLI v2 would page long output through `less`; v1 ignores this.
export AWS_PAGER=""

step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# usage_error MESSAGE: the message and the script's one-line usage, exit code 2.
# Each script sets USAGE before it parses its arguments.
usage_error() {
  printf '%s: %s\n%s\n' "$(basename "$0")" "$1" "$USAGE" >&2
  exit 2
}

# A private scratch directory, removed when the script exits.
S3EA_TMP=$(mktemp -d "${TMPDIR:-/tmp}/s3ea.XXXXXX")
trap 'rm -rf "$S3EA_TMP"' EXIT

# ---------------------------------------------------------------------------------
# Argument checks (each failure is a usage error: exit 2)

check_prefix() {
  case $1 in
    *[!A-Za-z0-9_-]* | "") usage_error "invalid prefix '$1': use letters, digits, '-' and '_'" ;;
  esac
  # The longest derived name is the role "<prefix>AggregatorRole" (IAM: 64 characters).
  if [ "${#1}" -lt 3 ] || [ "${#1}" -gt 48 ]; then
    usage_error "invalid prefix '$1': 3 to 48 characters"
  fi
}

check_bucket() {
  case $1 in
    *[!a-z0-9.-]* | "" | [.-]* | *[.-]) usage_error "invalid bucket name '$1'" ;;
  esac
  if [ "${#1}" -lt 3 ] || [ "${#1}" -gt 63 ]; then
    usage_error "invalid bucket name '$1': 3 to 63 characters"
  fi
}

# ---------------------------------------------------------------------------------
# Names. With --prefix X every name derives from X; the default prefix gives the
# names of the contract (table S3EventAggregator, queue S3EventAggregatorActionQueue).

set_names() {
  PREFIX=$1
  TABLE_NAME=$PREFIX
  ACTION_QUEUE=${PREFIX}ActionQueue
  ACTION_DLQ=${PREFIX}ActionDLQ
  AGGREGATOR_DLQ=${PREFIX}AggregatorDLQ
  AGGREGATOR_FUNCTION=$PREFIX
  REFRESHER_FUNCTION=${PREFIX}Refresher
  AGGREGATOR_ROLE=${PREFIX}AggregatorRole
  REFRESHER_ROLE=${PREFIX}RefresherRole
  AGGREGATOR_POLICY=${PREFIX}AggregatorPolicy
  REFRESHER_POLICY=${PREFIX}RefresherPolicy
  # Our entry's Id in each bucket's notification configuration.
  NOTIFICATION_ID=${PREFIX}ObjectEvents
}

# The Sid of the aggregator's resource-policy statement that lets one bucket invoke it.
permission_sid() { printf 'S3Invoke-%s' "$1"; }

# set_arns: needs REGION, ACCOUNT_ID and set_names. Commercial partition ("aws").
set_arns() {
  local sqs="arn:aws:sqs:$REGION:$ACCOUNT_ID" lambda="arn:aws:lambda:$REGION:$ACCOUNT_ID:function"
  TABLE_ARN="arn:aws:dynamodb:$REGION:$ACCOUNT_ID:table/$TABLE_NAME"
  ACTION_QUEUE_ARN="$sqs:$ACTION_QUEUE"
  ACTION_DLQ_ARN="$sqs:$ACTION_DLQ"
  AGGREGATOR_DLQ_ARN="$sqs:$AGGREGATOR_DLQ"
  AGGREGATOR_ARN="$lambda:$AGGREGATOR_FUNCTION"
  REFRESHER_ARN="$lambda:$REFRESHER_FUNCTION"
  AGGREGATOR_ROLE_ARN="arn:aws:iam::$ACCOUNT_ID:role/$AGGREGATOR_ROLE"
  REFRESHER_ROLE_ARN="arn:aws:iam::$ACCOUNT_ID:role/$REFRESHER_ROLE"
  AGGREGATOR_POLICY_ARN="arn:aws:iam::$ACCOUNT_ID:policy/$AGGREGATOR_POLICY"
  REFRESHER_POLICY_ARN="arn:aws:iam::$ACCOUNT_ID:policy/$REFRESHER_POLICY"
}

# render_policy FILE FUNCTION_NAME: an iam/ document with its placeholders filled in.
# Needs REGION, ACCOUNT_ID and set_names.
render_policy() {
  sed -e "s/REGION/$REGION/g" \
    -e "s/ACCOUNT_ID/$ACCOUNT_ID/g" \
    -e "s/TABLE_NAME/$TABLE_NAME/g" \
    -e "s/ACTION_QUEUE/$ACTION_QUEUE/g" \
    -e "s/AGGREGATOR_DLQ/$AGGREGATOR_DLQ/g" \
    -e "s/FUNCTION_NAME/$2/g" \
    "$1"
}

# ---------------------------------------------------------------------------------
# The AWS CLI. Every call goes through aws_cli, which pins the region and, when
# AWS_ENDPOINT_URL is set, passes it explicitly: AWS CLI v1 ignores the variable for
# some services (sqs at least), and such a call would silently reach real AWS.

aws_cli() {
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    aws --endpoint-url "$AWS_ENDPOINT_URL" --region "$REGION" "$@"
  else
    aws --region "$REGION" "$@"
  fi
}

# aws_maybe PATTERN ARGS...: runs `aws_cli ARGS...`. On success it returns 0 with the
# output in AWS_OUT. When the call fails with an error that matches the extended
# regular expression PATTERN (typically a not-found error), it returns 1. Any other
# failure prints the error and ends the script. Call it directly, not in $(...), so
# that the exit ends the script.
aws_maybe() {
  local pattern=$1
  shift
  AWS_OUT=
  if aws_cli "$@" >"$S3EA_TMP/out" 2>"$S3EA_TMP/err"; then
    AWS_OUT=$(cat "$S3EA_TMP/out")
    return 0
  fi
  if grep -Eq -- "$pattern" "$S3EA_TMP/err"; then
    return 1
  fi
  cat "$S3EA_TMP/err" >&2
  die "aws $1 $2 failed"
}

# retry_for_iam WHAT CMD...: IAM is eventually consistent, so a role or policy that was
# just created or changed may not be usable by Lambda yet. Rather than sleeping a
# fixed time, run the step that needs it and retry it while it fails with one of
# those propagation errors (about 2 minutes at most), then give up with its error.
IAM_PROPAGATION_ERRORS='cannot be assumed by Lambda|does not have permissions? to call|The provided execution role'
retry_for_iam() {
  local what=$1 attempt=1 delay=2
  shift
  while :; do
    if "$@" 2>"$S3EA_TMP/iam-err"; then
      cat "$S3EA_TMP/iam-err" >&2
      return 0
    fi
    if [ "$attempt" -ge 12 ] || ! grep -Eq -- "$IAM_PROPAGATION_ERRORS" "$S3EA_TMP/iam-err"; then
      cat "$S3EA_TMP/iam-err" >&2
      die "$what failed"
    fi
    info "$what: IAM change not visible to Lambda yet (attempt $attempt); retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    if [ "$delay" -lt 16 ]; then delay=$((delay * 2)); fi
  done
}

# ---------------------------------------------------------------------------------
# resolve_target REGION_FLAG. Region and account: --region, else AWS_REGION, else AWS_DEFAULT_REGION, else the CLI
# configuration (which honours AWS_PROFILE). The account is AWS_ACCOUNT_ID when set,
# else the caller's account from STS.

resolve_target() {
  local source
  if [ -n "$1" ]; then
    REGION=$1 source="--region"
  elif [ -n "${AWS_REGION:-}" ]; then
    REGION=$AWS_REGION source="AWS_REGION"
  elif [ -n "${AWS_DEFAULT_REGION:-}" ]; then
    REGION=$AWS_DEFAULT_REGION source="AWS_DEFAULT_REGION"
  else
    REGION=$(aws configure get region 2>/dev/null || true) source="aws configure${AWS_PROFILE:+ (profile $AWS_PROFILE)}"
  fi
  [ -n "$REGION" ] || die "no AWS region: pass --region, set AWS_REGION, or run 'aws configure set region REGION'"
  case $REGION in
    *[!a-z0-9-]*) die "invalid region '$REGION'" ;;
  esac

  if [ -n "${AWS_ACCOUNT_ID:-}" ]; then
    ACCOUNT_ID=$AWS_ACCOUNT_ID
  else
    ACCOUNT_ID=$(aws_cli sts get-caller-identity --query Account --output text) ||
      die "cannot read the account from STS: check the AWS credentials"
  fi
  case $ACCOUNT_ID in
    [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]) ;;
    *) die "invalid account id '$ACCOUNT_ID'" ;;
  esac
  set_arns

  step "Target: account $ACCOUNT_ID, region $REGION (from $source), prefix $PREFIX"
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    info "endpoint: $AWS_ENDPOINT_URL (AWS_ENDPOINT_URL)"
  fi
}

# ---------------------------------------------------------------------------------
# Per-bucket operations

# The bucket's notification configuration with our entry replaced or added (when
# $1 is "put") or removed (when $1 is "remove"). One JMESPath expression does it:
# merge(@, {...}) keeps every other key (queue and topic configurations, EventBridge)
# as it is, and only the Lambda list is rebuilt, without the entries whose Id is ours.
notification_query() {
  local others="LambdaFunctionConfigurations[?Id != '$NOTIFICATION_ID'] || \`[]\`"
  if [ "$1" = put ]; then
    local ours
    ours=$(printf '{"Id":"%s","LambdaFunctionArn":"%s","Events":%s}' \
      "$NOTIFICATION_ID" "$AGGREGATOR_ARN" "$S3_EVENTS")
    # shellcheck disable=SC2016 # the backticks are JMESPath literals, not a command
    printf 'merge(@, {LambdaFunctionConfigurations: [%s, [`%s`]][]})' "$others" "$ours"
  else
    printf 'merge(@, {LambdaFunctionConfigurations: %s})' "$others"
  fi
}

# Number of our entries in the bucket's notification configuration.
count_our_notifications() {
  aws_cli s3api get-bucket-notification-configuration --bucket "$1" \
    --query "length(LambdaFunctionConfigurations[?Id == '$NOTIFICATION_ID'] || \`[]\`)" --output text
}

# bucket_exists BUCKET: 0 if it exists, 1 if not; any other error ends the script.
bucket_exists() {
  aws_maybe 'NoSuchBucket|Not Found|\(404\)' s3api head-bucket --bucket "$1"
}

# require_bucket BUCKET: the bucket exists and is in the stack's region (S3 notifies
# only functions in the bucket's own region); otherwise the script ends.
require_bucket() {
  local location
  bucket_exists "$1" || die "bucket $1 does not exist (or is not visible to this account)"
  location=$(aws_cli s3api get-bucket-location --bucket "$1" --query LocationConstraint --output text)
  case $location in
    None | "") location=us-east-1 ;;
    EU) location=eu-west-1 ;;
  esac
  [ "$location" = "$REGION" ] ||
    die "bucket $1 is in $location, the stack in $REGION: S3 can only notify a function in the bucket's region"
}

# load_function_policy: the aggregator's resource policy, as one JSON string, into
# FUNCTION_POLICY (empty when the function has no policy or does not exist).
load_function_policy() {
  FUNCTION_POLICY=
  if aws_maybe 'ResourceNotFoundException' lambda get-policy --function-name "$AGGREGATOR_FUNCTION" \
    --query Policy --output text; then
    FUNCTION_POLICY=$AWS_OUT
  fi
}

# has_permission BUCKET: whether FUNCTION_POLICY has our statement for this bucket.
has_permission() {
  local sid
  sid=$(permission_sid "$1" | sed 's/\./\\./g') # dots in bucket names are literal
  printf '%s' "$FUNCTION_POLICY" | grep -Eq "\"Sid\" *: *\"$sid\""
}

# The buckets that FUNCTION_POLICY lets invoke the aggregator, one per line: the
# statements that attach_bucket adds are named S3Invoke-<bucket>.
attached_buckets() {
  printf '%s' "$FUNCTION_POLICY" | grep -Eo '"Sid" *: *"S3Invoke-[a-z0-9.-]+"' |
    sed -e 's/.*"S3Invoke-//' -e 's/"$//' | sort -u
}

# attach_bucket BUCKET: the permission for S3 to invoke the aggregator (for this
# bucket, from this account only), then our notification entry, in that order: S3
# checks that it may invoke the function when the configuration is written.
attach_bucket() {
  local bucket=$1 sid query config ours
  sid=$(permission_sid "$bucket")
  step "Bucket $bucket"
  require_bucket "$bucket"

  load_function_policy
  if has_permission "$bucket"; then
    info "permission $sid: present"
  else
    info "permission $sid: adding (principal s3.amazonaws.com, source account $ACCOUNT_ID, source arn:aws:s3:::$bucket)"
    aws_cli lambda add-permission --function-name "$AGGREGATOR_FUNCTION" --statement-id "$sid" \
      --action lambda:InvokeFunction --principal s3.amazonaws.com \
      --source-account "$ACCOUNT_ID" --source-arn "arn:aws:s3:::$bucket" >/dev/null
  fi

  ours=$(count_our_notifications "$bucket")
  if [ "$ours" = 0 ]; then
    info "notification $NOTIFICATION_ID: adding to the bucket's configuration (other entries kept)"
  else
    info "notification $NOTIFICATION_ID: replacing our entry (other entries kept)"
  fi
  query=$(notification_query put)
  config=$(aws_cli s3api get-bucket-notification-configuration --bucket "$bucket" --query "$query" --output json)
  if ! aws_cli s3api put-bucket-notification-configuration --bucket "$bucket" \
    --notification-configuration "$config" 2>"$S3EA_TMP/s3-err"; then
    cat "$S3EA_TMP/s3-err" >&2
    if grep -q 'overlap' "$S3EA_TMP/s3-err"; then
      die "bucket $bucket already sends object-created/removed events without a filter to another destination; S3 allows one destination per event type and key range (see docs/deploy.md)"
    fi
    die "cannot write the notification configuration of $bucket"
  fi
}

# detach_bucket BUCKET: our notification entry first, then the permission. Each part
# is skipped when it is already gone, so this also finishes an interrupted detach.
detach_bucket() {
  local bucket=$1 sid query config ours=0
  sid=$(permission_sid "$bucket")
  step "Bucket $bucket"
  if bucket_exists "$bucket"; then
    ours=$(count_our_notifications "$bucket")
  else
    info "bucket does not exist: no notification entry to remove"
  fi
  if [ "$ours" = 0 ]; then
    info "notification $NOTIFICATION_ID: absent"
  else
    info "notification $NOTIFICATION_ID: removing (other entries kept)"
    query=$(notification_query remove)
    config=$(aws_cli s3api get-bucket-notification-configuration --bucket "$bucket" --query "$query" --output json)
    # Only our entry goes; skip the destination check so that a stale foreign entry
    # (say, a deleted queue) cannot block the removal.
    aws_cli s3api put-bucket-notification-configuration --bucket "$bucket" \
      --notification-configuration "$config" --skip-destination-validation
  fi

  load_function_policy
  if has_permission "$bucket"; then
    info "permission $sid: removing"
    aws_cli lambda remove-permission --function-name "$AGGREGATOR_FUNCTION" --statement-id "$sid"
  else
    info "permission $sid: absent"
  fi
}

# Whether the aggregator function exists.
function_exists() {
  aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$1" \
    --query FunctionArn --output text
}
