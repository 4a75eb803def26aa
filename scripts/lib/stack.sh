# shellcheck shell=bash
# shellcheck disable=SC2034 # the names and ARNs set here are used by the scripts that source this
# Shared by scripts/create-stack.sh, attach-bucket.sh, detach-bucket.sh and
# delete-stack.sh (sourced, not run). It holds the resource names, the AWS CLI wrapper,
# region and account discovery, and the per-bucket operations: what lets the bucket's
# events reach the aggregator (a Lambda permission, the ingest queue's policy or the
# EventBridge rule's pattern, by ingest mode) and our part of the bucket's
# notification configuration.
#
# Only the aws CLI and POSIX tools are used here. JSON is handled with the CLI's own
# --query (JMESPath) and with text tools on documents whose shape we control.

S3EA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEFAULT_PREFIX=S3EventAggregator
# The events that reach the aggregator: every change of a listing, that is every object
# creation and removal, and every expiration by a lifecycle rule (S3 sends those as
# LifecycleExpiration:*, not as ObjectRemoved:*).
S3_EVENTS='["s3:ObjectCreated:*","s3:ObjectRemoved:*","s3:LifecycleExpiration:*"]'
# How the events reach it (--ingest): S3 invokes the aggregator (direct), S3 sends them
# to the ingest queue that the aggregator consumes (sqs), or S3 sends them to
# EventBridge, whose rule invokes the aggregator (eventbridge).
INGEST_MODES="direct, sqs or eventbridge"
# The aggregator function's tag that records the stack's ingest mode.
INGEST_TAG=s3ea:ingest
# The Sid of the aggregator's resource-policy statement for the EventBridge rule.
EVENTBRIDGE_SID=EventBridgeInvoke
# The EventBridge rule's tag key prefix that records a bucket whose EventBridge
# delivery attach-bucket turned on (so that detach-bucket turns it off again, and
# leaves it on for a bucket that had it on before).
EVENTBRIDGE_MARK=s3ea:eventbridge-enabled:

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
  # The longest derived name is the role "<prefix>EventsForwarder" (IAM: 64 characters).
  if [ "${#1}" -lt 3 ] || [ "${#1}" -gt 48 ]; then
    usage_error "invalid prefix '$1': 3 to 48 characters"
  fi
}

# check_ingest VALUE: prints the mode in lower case; anything else is a usage error.
check_ingest() {
  local mode
  mode=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
  case $mode in
    direct | sqs | eventbridge) printf '%s' "$mode" ;;
    *) usage_error "invalid --ingest '$1': $INGEST_MODES" ;;
  esac
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
  # --ingest sqs: the ingest queue, its DLQ, and the aggregator's extra policy.
  INGEST_QUEUE=${PREFIX}IngestQueue
  INGEST_DLQ=${PREFIX}IngestDLQ
  INGEST_POLICY=${PREFIX}AggregatorIngestPolicy
  # --ingest eventbridge: the rule on the default event bus.
  EVENT_RULE=${PREFIX}S3Events
  # Every stack: the rule that sends the gateways' "Storage Gateway Refresh Cache
  # Event" to the action queue, for the refresher (scripts/lib/completion.sh).
  COMPLETION_RULE=${PREFIX}RefreshCompleted
  # Gateways in the other regions of the refresher's GATEWAY_REGIONS: a rule of the
  # same name in each of those regions forwards their events to this region's default
  # event bus, with this role (scripts/lib/completion.sh).
  FORWARDER_ROLE=${PREFIX}EventsForwarder
  FORWARDER_POLICY=${PREFIX}EventsForwarderPolicy
  # Our entry's Id in each bucket's notification configuration (a Lambda entry with
  # --ingest direct, a queue entry with --ingest sqs).
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
  INGEST_QUEUE_ARN="$sqs:$INGEST_QUEUE"
  INGEST_DLQ_ARN="$sqs:$INGEST_DLQ"
  INGEST_POLICY_ARN="arn:aws:iam::$ACCOUNT_ID:policy/$INGEST_POLICY"
  EVENT_RULE_ARN="arn:aws:events:$REGION:$ACCOUNT_ID:rule/$EVENT_RULE"
  COMPLETION_RULE_ARN="arn:aws:events:$REGION:$ACCOUNT_ID:rule/$COMPLETION_RULE"
  FORWARDER_ROLE_ARN="arn:aws:iam::$ACCOUNT_ID:role/$FORWARDER_ROLE"
  HOME_BUS_ARN="arn:aws:events:$REGION:$ACCOUNT_ID:event-bus/default"
}

# render_policy FILE FUNCTION_NAME [BUCKET...]: an iam/ document with its placeholders
# filled in; the string "SOURCE_BUCKET_ARNS" becomes the JSON list of the buckets' ARNs.
# Needs REGION, ACCOUNT_ID and set_names.
render_policy() {
  local file=$1 function=$2 arns='' bucket
  shift 2
  for bucket in "$@"; do arns="$arns${arns:+,}\"arn:aws:s3:::$bucket\""; done
  sed -e "s/REGION/$REGION/g" \
    -e "s/ACCOUNT_ID/$ACCOUNT_ID/g" \
    -e "s/TABLE_NAME/$TABLE_NAME/g" \
    -e "s/ACTION_QUEUE/$ACTION_QUEUE/g" \
    -e "s/INGEST_QUEUE/$INGEST_QUEUE/g" \
    -e "s/AGGREGATOR_DLQ/$AGGREGATOR_DLQ/g" \
    -e "s/EVENT_RULE/$EVENT_RULE/g" \
    -e "s/COMPLETION_RULE/$COMPLETION_RULE/g" \
    -e "s/FUNCTION_NAME/$function/g" \
    -e "s/\"SOURCE_BUCKET_ARNS\"/[$arns]/g" \
    "$file"
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
#
# A bucket's events reach the aggregator in one of three ways (the ingest mode), and
# each needs two things: a grant that lets the bucket's events in, and our part of the
# bucket's notification configuration.
#
#   mode         grant                                         notification configuration
#   direct       Lambda permission S3Invoke-<bucket>           Lambda entry, Id <prefix>ObjectEvents
#   sqs          the bucket's ARN in the ingest queue's policy queue entry, Id <prefix>ObjectEvents
#   eventbridge  the bucket's name in the rule's event pattern EventBridge delivery turned on
#
# The grants double as the list of attached buckets, which delete-stack.sh reads.

# our_entry lambda|queue: our entry in a bucket's notification configuration, as JSON.
our_entry() {
  case $1 in
    lambda) printf '{"Id":"%s","LambdaFunctionArn":"%s","Events":%s}' "$NOTIFICATION_ID" "$AGGREGATOR_ARN" "$S3_EVENTS" ;;
    queue) printf '{"Id":"%s","QueueArn":"%s","Events":%s}' "$NOTIFICATION_ID" "$INGEST_QUEUE_ARN" "$S3_EVENTS" ;;
  esac
}

# notification_query ENTRY EVENTBRIDGE: the JMESPath expression that turns the bucket's
# notification configuration into the one to write back. Our entries (Id
# NOTIFICATION_ID) leave the Lambda and the queue lists, then ENTRY (lambda, queue or
# none) is added; every other entry of the lists passes through as it is. EVENTBRIDGE
# says what becomes of the bucket's EventBridge delivery: keep, on or off. For keep and
# on, merge(@, {...}) keeps every other key (topic configurations, EventBridge, any
# newer key) as it is. JMESPath cannot delete a key, so off rebuilds the configuration
# from its three lists of entries, which are all that it holds besides EventBridge.
#
# With DROP_LEGACY_ENTRY=true (create-stack.sh --migrate, delete-stack.sh), the 2018
# deployment's Lambda entry (Id LEGACY_NOTIFICATION_ID, scripts/lib/takeover.sh) leaves
# the Lambda list in the same write: it subscribes to the same event types as ours,
# so S3 would refuse the two side by side, and one write leaves no gap between them.
DROP_LEGACY_ENTRY=false
LEGACY_NOTIFICATION_ID=s3-event-aggregator
notification_query() {
  local lambda="LambdaFunctionConfigurations[?Id != '$NOTIFICATION_ID'] || \`[]\`"
  if $DROP_LEGACY_ENTRY; then
    lambda="LambdaFunctionConfigurations[?Id != '$NOTIFICATION_ID' && Id != '$LEGACY_NOTIFICATION_ID'] || \`[]\`"
  fi
  local queue="QueueConfigurations[?Id != '$NOTIFICATION_ID'] || \`[]\`"
  case $1 in
    lambda) lambda="[$lambda, [\`$(our_entry lambda)\`]][]" ;;
    queue) queue="[$queue, [\`$(our_entry queue)\`]][]" ;;
  esac
  local lists="LambdaFunctionConfigurations: $lambda, QueueConfigurations: $queue"
  # shellcheck disable=SC2016 # the backticks are JMESPath literals, not a command
  case $2 in
    keep) printf 'merge(@, {%s})' "$lists" ;;
    on) printf 'merge(@, {%s, EventBridgeConfiguration: `{}`})' "$lists" ;;
    off) printf '{TopicConfigurations: TopicConfigurations || `[]`, %s}' "$lists" ;;
  esac
}

# load_notification_state BUCKET: OURS_LAMBDA and OURS_QUEUE, the number of our
# entries in each list (0 or 1), LEGACY_ENTRY, the number of 2018 entries (Id
# LEGACY_NOTIFICATION_ID), EVENTBRIDGE_ON (True or False), and OURS_EVENTS, the event
# types of our entries, sorted and comma-separated (empty without an entry).
load_notification_state() {
  local state ours="[?Id == '$NOTIFICATION_ID']" legacy="[?Id == '$LEGACY_NOTIFICATION_ID']"
  state=$(aws_cli s3api get-bucket-notification-configuration --bucket "$1" --output text --query \
    "[length(LambdaFunctionConfigurations$ours || \`[]\`), length(QueueConfigurations$ours || \`[]\`), length(LambdaFunctionConfigurations$legacy || \`[]\`), EventBridgeConfiguration != \`null\`, join(',', sort([LambdaFunctionConfigurations$ours.Events[], QueueConfigurations$ours.Events[]][] || \`[]\`))]")
  read -r OURS_LAMBDA OURS_QUEUE LEGACY_ENTRY EVENTBRIDGE_ON OURS_EVENTS <<<"$state"
}

# s3_events_sorted: S3_EVENTS as OURS_EVENTS shows them (sorted, comma-separated).
s3_events_sorted() {
  printf '%s' "$S3_EVENTS" | tr -d '[]"' | tr ',' '\n' | LC_ALL=C sort | paste -sd, -
}

# write_notification BUCKET ENTRY EVENTBRIDGE [ARG...]: reads the bucket's notification
# configuration, changes our part (see notification_query) and writes it back; ARG...
# go to put-bucket-notification-configuration.
write_notification() {
  local bucket=$1 query config
  query=$(notification_query "$2" "$3")
  shift 3
  config=$(aws_cli s3api get-bucket-notification-configuration --bucket "$bucket" --query "$query" --output json)
  if ! aws_cli s3api put-bucket-notification-configuration --bucket "$bucket" \
    --notification-configuration "$config" "$@" 2>"$S3EA_TMP/s3-err"; then
    cat "$S3EA_TMP/s3-err" >&2
    if grep -q 'overlap' "$S3EA_TMP/s3-err"; then
      die "bucket $bucket already sends object created, removed or lifecycle expiration events without a filter to another destination; S3 allows one destination per event type and key range. Attach it with --ingest eventbridge instead, which needs no entry of its own (docs/deployment.md, Ingest mode)"
    fi
    die "cannot write the notification configuration of $bucket"
  fi
}

# bucket_exists BUCKET: 0 if it exists, 1 if not; any other error ends the script.
bucket_exists() {
  aws_maybe 'NoSuchBucket|Not Found|\(404\)' s3api head-bucket --bucket "$1"
}

# require_bucket BUCKET: the bucket exists and is in the stack's region (S3 notifies
# only functions and queues in the bucket's own region, and sends EventBridge events to
# the bus of its region); otherwise the script ends.
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

# --- direct: the Lambda permission -----------------------------------------------

# load_function_policy: the aggregator's resource policy, as one JSON string, into
# FUNCTION_POLICY (empty when the function has no policy or does not exist).
load_function_policy() {
  FUNCTION_POLICY=
  if aws_maybe 'ResourceNotFoundException' lambda get-policy --function-name "$AGGREGATOR_FUNCTION" \
    --query Policy --output text; then
    FUNCTION_POLICY=$AWS_OUT
  fi
}

# has_sid SID: whether FUNCTION_POLICY has a statement with this Sid.
has_sid() {
  local sid
  sid=$(printf '%s' "$1" | sed 's/\./\\./g') # dots in bucket names are literal
  printf '%s' "$FUNCTION_POLICY" | grep -Eq "\"Sid\" *: *\"$sid\""
}

# has_permission BUCKET: whether FUNCTION_POLICY has our statement for this bucket.
has_permission() { has_sid "$(permission_sid "$1")"; }

# The buckets that FUNCTION_POLICY lets invoke the aggregator, one per line: the
# statements that attach_bucket adds are named S3Invoke-<bucket>.
attached_buckets() {
  printf '%s' "$FUNCTION_POLICY" | { grep -Eo '"Sid" *: *"S3Invoke-[a-z0-9.-]+"' || true; } |
    sed -e 's/.*"S3Invoke-//' -e 's/"$//' | sort -u
}

# grant_lambda_permission BUCKET: S3 may invoke the aggregator for this bucket, from
# this account only.
grant_lambda_permission() {
  local bucket=$1 sid
  sid=$(permission_sid "$bucket")
  load_function_policy
  if has_permission "$bucket"; then
    info "permission $sid: present"
  else
    info "permission $sid: adding (principal s3.amazonaws.com, source account $ACCOUNT_ID, source arn:aws:s3:::$bucket)"
    aws_cli lambda add-permission --function-name "$AGGREGATOR_FUNCTION" --statement-id "$sid" \
      --action lambda:InvokeFunction --principal s3.amazonaws.com \
      --source-account "$ACCOUNT_ID" --source-arn "arn:aws:s3:::$bucket" >/dev/null
  fi
}

# revoke_lambda_permission BUCKET [quiet]: removes that statement; quiet says nothing
# when there is none.
revoke_lambda_permission() {
  local bucket=$1 sid
  sid=$(permission_sid "$bucket")
  load_function_policy
  if has_permission "$bucket"; then
    info "permission $sid: removing"
    aws_cli lambda remove-permission --function-name "$AGGREGATOR_FUNCTION" --statement-id "$sid"
  elif [ -z "${2:-}" ]; then
    info "permission $sid: absent"
  fi
}

# --- sqs: the ingest queue's policy ------------------------------------------------

# find_ingest_queue: 0 with INGEST_QUEUE_URL set when the ingest queue exists, else 1.
find_ingest_queue() {
  INGEST_QUEUE_URL=
  aws_maybe 'NonExistentQueue|QueueDoesNotExist' sqs get-queue-url --queue-name "$INGEST_QUEUE" \
    --query QueueUrl --output text || return 1
  INGEST_QUEUE_URL=$AWS_OUT
}

# load_queue_policy_buckets: QUEUE_POLICY_BUCKETS, the buckets that the ingest queue's
# policy lets send to it. Needs INGEST_QUEUE_URL.
load_queue_policy_buckets() {
  local policy bucket
  QUEUE_POLICY_BUCKETS=()
  policy=$(aws_cli sqs get-queue-attributes --queue-url "$INGEST_QUEUE_URL" --attribute-names Policy \
    --query Attributes.Policy --output text)
  [ "$policy" != None ] || return 0
  while IFS= read -r bucket; do
    QUEUE_POLICY_BUCKETS+=("$bucket")
  done < <(printf '%s' "$policy" | grep -Eo 'arn:aws:s3:::[a-z0-9.-]+' | sed 's/^arn:aws:s3::://' | sort -u)
}

# set_queue_policy URL [TEMPLATE [BUCKET...]]: the queue's policy becomes the rendered
# iam/TEMPLATE (see render_policy), or none without TEMPLATE.
set_queue_policy() {
  local url=$1 document=''
  if [ $# -gt 1 ]; then
    # The templates have no white space inside their strings.
    document=$(render_policy "$S3EA_ROOT/iam/$2" "" "${@:3}" | tr -d '[:space:]' | sed 's/"/\\"/g')
  fi
  printf '{"Policy":"%s"}' "$document" >"$S3EA_TMP/queue-policy.json"
  aws_cli sqs set-queue-attributes --queue-url "$url" --attributes "file://$S3EA_TMP/queue-policy.json"
}

# write_queue_policy BUCKET...: the ingest queue's policy (iam/ingest-queue-policy.json)
# lets S3 send these buckets' events, from this account only; with no bucket, the queue
# has no policy at all. Needs INGEST_QUEUE_URL.
write_queue_policy() {
  if [ $# -gt 0 ]; then
    set_queue_policy "$INGEST_QUEUE_URL" ingest-queue-policy.json "$@"
  else
    set_queue_policy "$INGEST_QUEUE_URL"
  fi
}

# update_queue_policy add|remove BUCKET [quiet]: adds the bucket to the ingest queue's
# policy (and writes the policy anew, so that a changed template applies), or removes
# it. The queue must exist.
update_queue_policy() {
  local action=$1 bucket=$2 quiet=${3:-} others=() listed=false b
  find_ingest_queue || die "queue $INGEST_QUEUE does not exist"
  load_queue_policy_buckets
  for b in ${QUEUE_POLICY_BUCKETS[@]+"${QUEUE_POLICY_BUCKETS[@]}"}; do
    if [ "$b" = "$bucket" ]; then listed=true; else others+=("$b"); fi
  done
  if [ "$action" = add ]; then
    if $listed; then
      info "queue policy of $INGEST_QUEUE: $bucket present"
    else
      info "queue policy of $INGEST_QUEUE: letting $bucket send (principal s3.amazonaws.com, source account $ACCOUNT_ID, source arn:aws:s3:::$bucket)"
    fi
    write_queue_policy ${others[@]+"${others[@]}"} "$bucket"
  elif $listed; then
    info "queue policy of $INGEST_QUEUE: removing $bucket${others[*]:+ (other buckets: ${#others[@]})}"
    write_queue_policy ${others[@]+"${others[@]}"}
  elif [ -z "$quiet" ]; then
    info "queue policy of $INGEST_QUEUE: $bucket absent"
  fi
}

# --- eventbridge: the rule's event pattern, and the bucket's EventBridge delivery --

# rule_exists: 0 when the EventBridge rule exists, else 1.
rule_exists() {
  aws_maybe 'ResourceNotFoundException' events describe-rule --name "$EVENT_RULE" --query Arn --output text
}

# load_rule_buckets: RULE_BUCKETS, the bucket names in the rule's event pattern. The
# rule must exist. The pattern is ours (rule_pattern), with one "name" list.
load_rule_buckets() {
  local pattern bucket
  RULE_BUCKETS=()
  pattern=$(aws_cli events describe-rule --name "$EVENT_RULE" --query EventPattern --output text)
  while IFS= read -r bucket; do
    if [ -n "$bucket" ]; then RULE_BUCKETS+=("$bucket"); fi
  done < <(printf '%s' "$pattern" | sed -n 's/.*"name" *: *\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d ' "' | sort -u)
}

# rule_pattern BUCKET...: the rule's event pattern: object created and deleted events
# from these buckets. With no bucket, it names only "", which no bucket is called.
# "Object Deleted" covers lifecycle expirations too (detail.reason "Lifecycle
# Expiration", detail.deletion-type "Permanently Deleted" or "Delete Marker Created"),
# so the pattern must not filter on the reason.
rule_pattern() {
  local names='' bucket
  for bucket in "$@"; do names="$names${names:+,}\"$bucket\""; done
  printf '{"source":["aws.s3"],"detail-type":["Object Created","Object Deleted"],"detail":{"bucket":{"name":[%s]}}}' \
    "${names:-\"\"}"
}

# write_rule BUCKET...: creates or updates the rule with the pattern for these buckets;
# it is enabled when there is at least one.
write_rule() {
  local state=ENABLED
  [ $# -gt 0 ] || state=DISABLED
  aws_cli events put-rule --name "$EVENT_RULE" --event-pattern "$(rule_pattern "$@")" --state "$state" \
    --description "s3-event-aggregator ($PREFIX): object events of the attached buckets to $AGGREGATOR_FUNCTION" >/dev/null
}

# update_rule add|remove BUCKET [quiet]: adds the bucket to the rule's pattern (and
# writes the rule anew), or removes it. The rule must exist.
update_rule() {
  local action=$1 bucket=$2 quiet=${3:-} others=() listed=false b
  load_rule_buckets
  for b in ${RULE_BUCKETS[@]+"${RULE_BUCKETS[@]}"}; do
    if [ "$b" = "$bucket" ]; then listed=true; else others+=("$b"); fi
  done
  if [ "$action" = add ]; then
    if $listed; then
      info "rule $EVENT_RULE: $bucket present in its event pattern"
    else
      info "rule $EVENT_RULE: adding $bucket to its event pattern"
    fi
    write_rule ${others[@]+"${others[@]}"} "$bucket"
  elif $listed; then
    if [ "${#others[@]}" -eq 0 ]; then
      info "rule $EVENT_RULE: removing $bucket, the last bucket, from its event pattern (the rule is disabled)"
    else
      info "rule $EVENT_RULE: removing $bucket from its event pattern (other buckets: ${#others[@]})"
    fi
    write_rule ${others[@]+"${others[@]}"}
  elif [ -z "$quiet" ]; then
    info "rule $EVENT_RULE: $bucket absent from its event pattern"
  fi
}

# eventbridge_marked BUCKET: 0 when attach-bucket turned on the bucket's EventBridge
# delivery (a tag on the rule records it), else 1.
eventbridge_marked() {
  aws_maybe 'ResourceNotFoundException' events list-tags-for-resource --resource-arn "$EVENT_RULE_ARN" \
    --query "length(Tags[?Key == '$EVENTBRIDGE_MARK$1'])" --output text || return 1
  [ "$AWS_OUT" != 0 ]
}

mark_eventbridge() {
  if ! aws_maybe 'TooManyTags|LimitExceeded|[Tt]ags? (limit|quota)' events tag-resource --resource-arn "$EVENT_RULE_ARN" \
    --tags "[{\"Key\":\"$EVENTBRIDGE_MARK$1\",\"Value\":\"attach-bucket\"}]"; then
    warn "cannot tag rule $EVENT_RULE (too many tags): detach-bucket.sh will leave the EventBridge delivery of $1 on"
  fi
}

unmark_eventbridge() {
  aws_maybe 'ResourceNotFoundException' events untag-resource --resource-arn "$EVENT_RULE_ARN" \
    --tag-keys "$EVENTBRIDGE_MARK$1" || true
}

# --- the stack's ingest mode ---------------------------------------------------------

# load_recorded_ingest: RECORDED_INGEST, the mode that the aggregator's tag records
# (empty when the function or the tag does not exist: a stack created before --ingest,
# whose mode is direct).
load_recorded_ingest() {
  RECORDED_INGEST=
  if aws_maybe 'ResourceNotFoundException' lambda list-tags --resource "$AGGREGATOR_ARN" \
    --query "Tags.\"$INGEST_TAG\"" --output text && [ "$AWS_OUT" != None ]; then
    RECORDED_INGEST=$AWS_OUT
  fi
}

# find_ingest_mapping: 0 with INGEST_MAPPING_UUID set when the event source mapping from
# the ingest queue to the aggregator exists, else 1.
find_ingest_mapping() {
  INGEST_MAPPING_UUID=
  aws_maybe 'ResourceNotFoundException' lambda list-event-source-mappings --function-name "$AGGREGATOR_FUNCTION" \
    --event-source-arn "$INGEST_QUEUE_ARN" --query "EventSourceMappings[?State != 'Deleting'].UUID | [0]" \
    --output text || return 1
  [ "$AWS_OUT" != None ] && [ -n "$AWS_OUT" ] || return 1
  INGEST_MAPPING_UUID=$AWS_OUT
}

# rule_targets_aggregator: 0 when the rule exists and targets the aggregator.
rule_targets_aggregator() {
  aws_maybe 'ResourceNotFoundException' events list-targets-by-rule --rule "$EVENT_RULE" \
    --query "length(Targets[?Arn == '$AGGREGATOR_ARN'])" --output text || return 1
  [ "$AWS_OUT" != 0 ]
}

# require_ingest MODE: the stack has the resources that MODE needs (direct: the
# function, which the caller checks; sqs: the ingest queue and its mapping;
# eventbridge: the rule and its target), otherwise the script ends with the command
# that adds them.
require_ingest() {
  local mode=$1 missing=
  case $mode in
    direct) return 0 ;;
    sqs)
      if ! find_ingest_queue; then
        missing="the ingest queue $INGEST_QUEUE"
      elif ! find_ingest_mapping; then
        missing="the event source mapping $INGEST_QUEUE -> $AGGREGATOR_FUNCTION"
      fi
      ;;
    eventbridge)
      rule_targets_aggregator || missing="the EventBridge rule $EVENT_RULE (with the aggregator as its target)"
      ;;
  esac
  [ -z "$missing" ] && return 0
  load_recorded_ingest
  die "the stack $PREFIX was created with --ingest ${RECORDED_INGEST:-direct}, not $mode: $missing does not exist. Create what --ingest $mode needs with: scripts/create-stack.sh --prefix $PREFIX --ingest $mode BUCKET..."
}

# ---------------------------------------------------------------------------------
# Attach and detach

# attach_bucket BUCKET MODE: first the grant for MODE (S3 checks a Lambda or queue
# destination when the configuration is written, and the rule must match before the
# events flow), then the notification configuration in one write (our entry for MODE,
# without the entry of another mode, and the EventBridge delivery), then the grants of
# the other modes. A bucket that was attached with another mode switches without a gap.
attach_bucket() {
  local bucket=$1 mode=$2 entry eventbridge=keep kind
  step "Bucket $bucket (ingest $mode)"
  require_bucket "$bucket"
  load_notification_state "$bucket"
  if [ "$LEGACY_ENTRY" != 0 ] && ! $DROP_LEGACY_ENTRY; then
    die "bucket $bucket has the notification entry $LEGACY_NOTIFICATION_ID of the 2018 deployment, which sends the same events: take that deployment over first with scripts/create-stack.sh --migrate BUCKET... (docs/takeover-2018.md)"
  fi

  case $mode in
    direct) grant_lambda_permission "$bucket"; entry=lambda kind=Lambda ;;
    sqs) update_queue_policy add "$bucket"; entry=queue kind=queue ;;
    eventbridge) update_rule add "$bucket"; entry=none ;;
  esac

  load_notification_state "$bucket"
  if [ "$entry" = none ]; then
    if [ "$OURS_LAMBDA" != 0 ] || [ "$OURS_QUEUE" != 0 ]; then
      info "notification $NOTIFICATION_ID: removing our entry (other entries kept)"
    fi
  elif [ "$OURS_LAMBDA" = 0 ] && [ "$OURS_QUEUE" = 0 ]; then
    info "notification $NOTIFICATION_ID: adding a $kind entry to the bucket's configuration (other entries kept)"
  elif { [ "$entry" = lambda ] && [ "$OURS_LAMBDA" != 0 ]; } || { [ "$entry" = queue ] && [ "$OURS_QUEUE" != 0 ]; }; then
    if [ "$OURS_EVENTS" != "$(s3_events_sorted)" ]; then
      info "notification $NOTIFICATION_ID: updating our entry's events from ${OURS_EVENTS:-none} to $(s3_events_sorted) (other entries kept)"
    else
      info "notification $NOTIFICATION_ID: replacing our entry (other entries kept)"
    fi
  else
    info "notification $NOTIFICATION_ID: replacing our entry by a $kind entry (other entries kept)"
  fi
  if [ "$LEGACY_ENTRY" != 0 ]; then
    info "notification $LEGACY_NOTIFICATION_ID (the 2018 entry): removing, in the same write"
  fi
  if [ "$mode" = eventbridge ]; then
    if [ "$EVENTBRIDGE_ON" != True ]; then
      info "EventBridge delivery: turning on"
      mark_eventbridge "$bucket"
      eventbridge=on
    elif eventbridge_marked "$bucket"; then
      info "EventBridge delivery: on (turned on by attach-bucket)"
    else
      info "EventBridge delivery: on already (it was on before: detach-bucket will leave it on)"
    fi
  elif eventbridge_marked "$bucket"; then
    info "EventBridge delivery: turning off (attach-bucket turned it on for --ingest eventbridge)"
    eventbridge=off
  fi
  write_notification "$bucket" "$entry" "$eventbridge"
  if [ "$eventbridge" = off ]; then unmark_eventbridge "$bucket"; fi

  if [ "$mode" != direct ]; then revoke_lambda_permission "$bucket" quiet; fi
  if [ "$mode" != sqs ] && find_ingest_queue; then update_queue_policy remove "$bucket" quiet; fi
  if [ "$mode" != eventbridge ] && rule_exists; then update_rule remove "$bucket" quiet; fi
}

# detach_bucket BUCKET: whatever the mode, our notification entry and the EventBridge
# delivery that attach-bucket turned on go first, then every grant for the bucket. Each
# part is skipped when it is already gone, so this also finishes an interrupted detach.
detach_bucket() {
  local bucket=$1 eventbridge=keep
  step "Bucket $bucket"
  if eventbridge_marked "$bucket"; then eventbridge=off; fi
  if bucket_exists "$bucket"; then
    load_notification_state "$bucket"
    if [ "$OURS_LAMBDA" = 0 ] && [ "$OURS_QUEUE" = 0 ]; then
      info "notification $NOTIFICATION_ID: absent"
    else
      info "notification $NOTIFICATION_ID: removing (other entries kept)"
    fi
    if ! $DROP_LEGACY_ENTRY; then
      LEGACY_ENTRY=0
    elif [ "$LEGACY_ENTRY" != 0 ]; then
      info "notification $LEGACY_NOTIFICATION_ID (the 2018 entry): removing"
    fi
    if [ "$eventbridge" = off ]; then
      info "EventBridge delivery: turning off (attach-bucket turned it on)"
    elif [ "$EVENTBRIDGE_ON" = True ]; then
      info "EventBridge delivery: on, left on (attach-bucket did not turn it on)"
    fi
    if [ "$OURS_LAMBDA" != 0 ] || [ "$OURS_QUEUE" != 0 ] || [ "$LEGACY_ENTRY" != 0 ] || [ "$eventbridge" = off ]; then
      # Only our part goes; skip the destination check so that a stale foreign entry
      # (say, a deleted queue) cannot block the removal.
      write_notification "$bucket" none "$eventbridge" --skip-destination-validation
    fi
  else
    info "bucket does not exist: no notification entry to remove"
  fi
  if [ "$eventbridge" = off ]; then unmark_eventbridge "$bucket"; fi

  revoke_lambda_permission "$bucket"
  if find_ingest_queue; then update_queue_policy remove "$bucket"; fi
  if rule_exists; then update_rule remove "$bucket"; fi
}

# load_all_attached_buckets: ALL_BUCKETS, every bucket that a grant names, whatever its
# mode.
load_all_attached_buckets() {
  local bucket
  load_function_policy
  attached_buckets >"$S3EA_TMP/attached"
  if find_ingest_queue; then
    load_queue_policy_buckets
    printf '%s\n' ${QUEUE_POLICY_BUCKETS[@]+"${QUEUE_POLICY_BUCKETS[@]}"} >>"$S3EA_TMP/attached"
  fi
  if rule_exists; then
    load_rule_buckets
    printf '%s\n' ${RULE_BUCKETS[@]+"${RULE_BUCKETS[@]}"} >>"$S3EA_TMP/attached"
  fi
  ALL_BUCKETS=()
  while IFS= read -r bucket; do
    if [ -n "$bucket" ]; then ALL_BUCKETS+=("$bucket"); fi
  done < <(sort -u "$S3EA_TMP/attached")
}

# Whether the aggregator function exists.
function_exists() {
  aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$1" \
    --query FunctionArn --output text
}

# ---------------------------------------------------------------------------------
# IAM deletion (delete-stack.sh, and the 2018 roles and policies in
# scripts/lib/takeover.sh): detach a policy from every entity, drop its old versions,
# delete it; a role loses its attached and inline policies, then goes.

# delete_policy ARN: the customer managed policy, from wherever it is attached.
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

# delete_role NAME: the role, once its managed policies are detached (they stay) and
# its inline policies deleted.
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

# ---------------------------------------------------------------------------------
# Resource policies with statements that are not ours (the action queue's): merged
# by Sid, without a JSON tool. split_policy reads one policy document on stdin and
# prints it as lines: "P" and the text before the Statement list, "S" and each
# statement, "X" and the text after the list (each with the document's line breaks
# turned into spaces, which JSON allows outside strings and forbids inside them). A
# Statement that is a single object rather than a list prints as one "S" line. It
# prints nothing for a document without a top-level Statement.
split_policy() {
  tr '\n\r' '  ' | awk '
    function flush_statement() {
      if (current ~ /[^ \t]/) print "S" current
      current = ""
    }
    {
      text = $0; n = length(text); depth = 0; instr = 0; esc = 0; key = ""; lastkey = ""
      state = 0 # 0 before the Statement value, 1 in its list, 2 in a lone object, 3 after it
      before = ""; after = ""; current = ""; sdepth = 0
      for (i = 1; i <= n; i++) {
        c = substr(text, i, 1)
        if (state == 3) { after = after c; continue }
        if (instr) {
          if (esc) esc = 0
          else if (c == "\\") esc = 1
          else if (c == "\"") instr = 0
          if (state == 0) { before = before c; if (instr) key = key c } else current = current c
          continue
        }
        if (c == "\"") {
          instr = 1
          if (state == 0) { before = before c; key = "" } else current = current c
          continue
        }
        if (state == 0) {
          if (c == ":" && depth == 1) lastkey = key
          if ((c == "[" || c == "{") && depth == 1 && lastkey == "Statement") {
            state = (c == "[") ? 1 : 2
            sdepth = depth + 1
            depth++
            if (state == 2) current = c
            continue
          }
          if (c == "{" || c == "[") depth++
          if (c == "}" || c == "]") depth--
          if (c == ",") lastkey = ""
          before = before c
          continue
        }
        # In the Statement value.
        if (c == "{" || c == "[") depth++
        if (c == "}" || c == "]") depth--
        if (state == 1 && depth < sdepth) { flush_statement(); state = 3; continue }
        if (state == 1 && c == "," && depth == sdepth) { flush_statement(); continue }
        current = current c
        if (state == 2 && depth < sdepth) { flush_statement(); state = 3 }
      }
      if (state == 3) { print "P" before; print "X" after }
    }'
}

# statement_sid STATEMENT: its Sid, or nothing.
statement_sid() {
  printf '%s' "$1" | { grep -o '"Sid"[[:space:]]*:[[:space:]]*"[^"\\]*"' || true; } | head -n 1 |
    sed 's/^"Sid"[[:space:]]*:[[:space:]]*"//; s/"$//'
}

# merge_policy CURRENT OURS: the document CURRENT (empty for none) with the statements
# of the document OURS in place of its statements of the same Sid; every other
# statement, and everything else in CURRENT, stays as it is. Prints the result.
merge_policy() {
  local current=$1 ours=$2 line sid prefix='' suffix='' statements='' our_sids=, sep=''
  while IFS= read -r line; do
    case $line in
      S*)
        sid=$(statement_sid "${line#S}")
        [ -n "$sid" ] || die "a statement of our policy template has no Sid"
        our_sids="$our_sids$sid,"
        ;;
    esac
  done < <(printf '%s' "$ours" | split_policy)
  if [ -z "$current" ]; then
    printf '%s' "$ours"
    return
  fi
  printf '%s' "$current" | split_policy >"$S3EA_TMP/split"
  [ -s "$S3EA_TMP/split" ] || return 1
  while IFS= read -r line; do
    case $line in
      P*) prefix=${line#P} ;;
      X*) suffix=${line#X} ;;
      S*)
        sid=$(statement_sid "${line#S}")
        if [ -z "$sid" ] || [[ $our_sids != *",$sid,"* ]]; then
          statements="$statements$sep${line#S}"
          sep=,
        fi
        ;;
    esac
  done <"$S3EA_TMP/split"
  while IFS= read -r line; do
    case $line in S*) statements="$statements$sep${line#S}" sep=, ;; esac
  done < <(printf '%s' "$ours" | split_policy)
  printf '%s[%s]%s' "$prefix" "$statements" "$suffix"
}
