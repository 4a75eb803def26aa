#!/usr/bin/env bash
# Creates or updates the whole stack in one AWS account and region, and attaches the
# given buckets. Safe to run again: every step converges on the state described below.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"
# shellcheck source=scripts/lib/monitoring.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/monitoring.sh"
# shellcheck source=scripts/lib/completion.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/completion.sh"
# shellcheck source=scripts/lib/takeover.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/takeover.sh"

USAGE="usage: scripts/create-stack.sh [--prefix NAME] [--ingest direct|sqs|eventbridge] [--delay SECONDS] [--log-level LEVEL] [--log-format json|text] [--gateway-regions REGION,...] [--min-refresh-interval SECONDS] [--allow-short-refresh-interval] [--arch arm64|x86_64] [--alarm-topic ARN] [--migrate] [--region REGION] BUCKET..."

# Function settings (the same as [package.metadata.lambda.deploy] in the crates).
AGGREGATOR_TIMEOUT=30
AGGREGATOR_MEMORY=128
REFRESHER_TIMEOUT=60
REFRESHER_MEMORY=128
# SQS: the action queue's visibility timeout must be at least 6 times the timeout of
# the function it feeds; a message that fails this many times goes to the DLQ.
ACTION_VISIBILITY_TIMEOUT=$((6 * REFRESHER_TIMEOUT))
ACTION_MAX_RECEIVE_COUNT=10
DLQ_RETENTION_SECONDS=1209600 # 14 days, the SQS maximum
ACTION_RETENTION_SECONDS=345600 # 4 days
# The refresher: at most two invocations at a time (docs/deployment.md, "Concurrency").
REFRESHER_CONCURRENCY=2
REFRESHER_BATCH_SIZE=10
# The aggregator's asynchronous invocations: Lambda retries a failed event twice and
# keeps it for up to 6 hours, then sends it to the aggregator DLQ.
AGGREGATOR_RETRIES=2
AGGREGATOR_MAX_EVENT_AGE=21600
LOG_RETENTION_DAYS=30
# --ingest sqs: the aggregator takes up to 10,000 events per invocation, gathered for
# up to 5 seconds (a batch larger than 10 needs a batching window). The ingest queue's
# visibility timeout is 6 times the aggregator's timeout plus that window (AWS's
# guidance for SQS event sources); an event that fails 5 times goes to the ingest DLQ.
INGEST_BATCH_SIZE=10000
INGEST_BATCH_WINDOW=5
INGEST_VISIBILITY_TIMEOUT=$((6 * AGGREGATOR_TIMEOUT + INGEST_BATCH_WINDOW))
INGEST_MAX_RECEIVE_COUNT=5
INGEST_RETENTION_SECONDS=345600 # 4 days
# --ingest eventbridge: EventBridge retries an event that Lambda does not accept for up
# to 24 hours (185 attempts, its maximum), then sends it to the aggregator DLQ.
EVENTBRIDGE_MAX_EVENT_AGE=86400
EVENTBRIDGE_RETRIES=185

help() {
  cat <<EOF
$USAGE

Creates, or brings up to date, the s3-event-aggregator stack in the AWS account and
region of the AWS CLI configuration, then attaches each BUCKET: the bucket's object
events reach the aggregator the way --ingest says, and the bucket's notification
configuration gains our part (every other entry stays as it is). Running it again
converges; it creates nothing twice.

Options (each overrides the environment variable in brackets):
  --prefix NAME        name prefix of every resource [S3EA_PREFIX] (default $DEFAULT_PREFIX)
  --ingest MODE        how the buckets' events reach the aggregator [S3EA_INGEST]
                       (default: the mode the stack was created with, else direct):
                       direct       S3 invokes the aggregator (a Lambda notification entry)
                       sqs          S3 sends to the ingest queue <prefix>IngestQueue (a
                                    queue entry); the aggregator takes up to $INGEST_BATCH_SIZE
                                    events per invocation, gathered for up to ${INGEST_BATCH_WINDOW}s
                       eventbridge  S3 sends to EventBridge (the bucket's EventBridge
                                    delivery is turned on); the rule <prefix>S3Events
                                    invokes the aggregator
                       The mode is recorded on the aggregator (tag ${INGEST_TAG:?}), so that
                       attach-bucket.sh uses it. A new mode adds its resources and moves the
                       given BUCKETs to it; other buckets keep theirs until re-attached.
  --delay SECONDS      aggregator REFRESH_DELAY_SECONDS, 0 to 43200 [REFRESH_DELAY_SECONDS]
                       (default: the function's current value, else 30)
  --log-level LEVEL    LOG_LEVEL of both functions: DEBUG, INFO, WARN, ERROR [LOG_LEVEL]
                       (default: each function's current value, else INFO)
  --log-format FORMAT  json or text: both functions' Lambda logging configuration
                       [S3EA_LOG_FORMAT] (default: each function's current one):
                       json  LogFormat=JSON, SystemLogLevel=WARN (no START, END and
                             REPORT lines), ApplicationLogLevel=DEBUG when LOG_LEVEL
                             is DEBUG, else INFO (above INFO, Lambda would drop the
                             EMF metric lines; LOG_LEVEL makes the function quieter)
                       text  LogFormat=Text
                       A re-run without it keeps the format; with JSON it sets the
                       application level from LOG_LEVEL again.
  --gateway-regions R1,R2
                       refresher GATEWAY_REGIONS: the regions whose gateways' shares it
                       refreshes, comma-separated region names [GATEWAY_REGIONS]
                       (default: the function's current value, else not set, which
                       means the function's own region). A re-run without it leaves
                       the current value as it is; to go back to the own region only,
                       pass that region. Each region other than this one gets the rule
                       <prefix>RefreshCompleted too, which forwards its gateways'
                       refresh-complete events to this region's default event bus, with
                       the role <prefix>EventsForwarder; a region that leaves the list
                       loses its rule (docs/deployment.md).
  --min-refresh-interval SECONDS
                       refresher MIN_REFRESH_INTERVAL_SECONDS, 0 to 3600: the least time
                       between two RefreshCache calls on one share
                       [MIN_REFRESH_INTERVAL_SECONDS] (default: the function's current
                       value, else 60). A re-run without it keeps the current value.
                       Below 60 it needs --allow-short-refresh-interval.
  --allow-short-refresh-interval
                       accept a --min-refresh-interval below 60 s [ALLOW_SHORT_REFRESH_INTERVAL=true]:
                       a RefreshCache within 60 s of the previous one may not evict the
                       share's cached entries, so deleted objects may stay visible. Sets
                       ALLOW_SHORT_REFRESH_INTERVAL=true on the refresher, without which
                       it refuses such an interval at start-up; an interval of 60 or
                       more removes it. A re-run that keeps the current interval keeps
                       the function's acknowledgement.
  --arch ARCH          arm64 or x86_64 [S3EA_ARCH] (default arm64)
  --alarm-topic ARN    puts the CloudWatch alarms <prefix>-* (docs/operating.md),
                       each notifying this SNS topic, arn:aws:sns:REGION:ACCOUNT:NAME,
                       on ALARM and on OK [S3EA_ALARM_TOPIC]. A re-run without it keeps
                       the existing alarms as they are; with it, puts them all again.
                       Every run also puts the dashboard <prefix>.
  --migrate            take over a deployment of the 2018 scripts
                       (docs/takeover-2018.md). Without it, a run that finds one (the
                       function S3EventAggregator on Python, S3StorageGatewayRefresh and
                       its mapping, the entries s3-event-aggregator, the permissions
                       SID_<bucket>, the roles S3EventAggregatorLambdaRole and
                       S3AggregatorActionLambdaRole, the policies S3EventAggregatorDynamo,
                       S3EventAggregatorSqsWriter, S3EventAggregatorSqsReader and
                       StorageGatewayRefreshPolicy) prints what it found and stops before
                       it changes anything. With it, the 2018 aggregator is converted in
                       place, each BUCKET's 2018 entry is replaced by ours (other entries
                       kept), then the 2018 mapping, function, permissions, roles and
                       policies are removed; the table and the queue are kept. Name every
                       bucket of the 2018 deployment. Default prefix only (the 2018 names
                       are fixed); with no 2018 deployment it is a plain run.
  --region REGION      AWS region [AWS_REGION, AWS_DEFAULT_REGION, then the CLI config]
  -h, --help           this help
BUCKET... may also come from S3EA_BUCKETS (space-separated) when no BUCKET is given.

Other environment variables:
  S3EA_BILLING_MODE    DynamoDB capacity: on-demand (default) or provisioned
  S3EA_READ_CAPACITY, S3EA_WRITE_CAPACITY   provisioned capacity units (default 1 and 5)
  S3EA_DEPLOY_TOOL     cargo-lambda (default: cargo lambda deploy) or aws-cli
                       (aws lambda create-function / update-function-code)
  S3EA_SKIP_BUILD=1    deploy the zip files already in target/lambda/ without building
  AWS_ACCOUNT_ID       skip the STS look-up of the account
  AWS_PROFILE, AWS_ENDPOINT_URL and the other AWS CLI variables are honoured.

Resources, with the default prefix: DynamoDB table S3EventAggregator; SQS queues
S3EventAggregatorActionQueue, S3EventAggregatorActionDLQ, S3EventAggregatorAggregatorDLQ;
IAM roles and policies S3EventAggregator{Aggregator,Refresher}{Role,Policy}; Lambda
functions S3EventAggregator and S3EventAggregatorRefresher with their log groups; the
SQS event source mapping of the refresher; the EventBridge rule
S3EventAggregatorRefreshCompleted (refresh-complete events to the action queue) and the
action queue's policy statement for it; with gateway regions besides this one, a rule
S3EventAggregatorRefreshCompleted in each of them (forwarding to this region's default
event bus) and the IAM role S3EventAggregatorEventsForwarder. With --ingest sqs also the queues
S3EventAggregatorIngestQueue and S3EventAggregatorIngestDLQ, the policy
S3EventAggregatorAggregatorIngestPolicy and the mapping of the ingest queue to the
aggregator; with --ingest eventbridge the rule S3EventAggregatorS3Events. The
CloudWatch dashboard S3EventAggregator, and with --alarm-topic the CloudWatch alarms
S3EventAggregator-*. See docs/deployment.md and iam/README.md.
EOF
}

# ---------------------------------------------------------------------------------
# Arguments

PREFIX_ARG=${S3EA_PREFIX:-$DEFAULT_PREFIX}
INGEST_ARG=${S3EA_INGEST:-}
INGEST_GIVEN=${INGEST_ARG:+yes}
DELAY_ARG=${REFRESH_DELAY_SECONDS:-}
LOG_LEVEL_ARG=${LOG_LEVEL:-}
LOG_FORMAT_ARG=${S3EA_LOG_FORMAT:-}
GATEWAY_REGIONS_ARG=${GATEWAY_REGIONS:-}
GATEWAY_REGIONS_GIVEN=${GATEWAY_REGIONS_ARG:+yes}
MIN_INTERVAL_ARG=${MIN_REFRESH_INTERVAL_SECONDS:-}
MIN_INTERVAL_GIVEN=${MIN_INTERVAL_ARG:+yes}
ALLOW_SHORT_ARG=${ALLOW_SHORT_REFRESH_INTERVAL:-}
ALLOW_SHORT_OPTION=false
MIGRATE=false
ARCH=${S3EA_ARCH:-arm64}
ALARM_TOPIC_ARG=${S3EA_ALARM_TOPIC:-}
ALARM_TOPIC_GIVEN=${ALARM_TOPIC_ARG:+yes}
REGION_FLAG=
BUCKETS=()

need_value() { [ "$1" -ge 2 ] || usage_error "$2 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --prefix) need_value $# "$1"; PREFIX_ARG=$2; shift 2 ;;
    --prefix=*) PREFIX_ARG=${1#*=}; shift ;;
    --ingest) need_value $# "$1"; INGEST_ARG=$2 INGEST_GIVEN=yes; shift 2 ;;
    --ingest=*) INGEST_ARG=${1#*=} INGEST_GIVEN=yes; shift ;;
    --delay) need_value $# "$1"; DELAY_ARG=$2; shift 2 ;;
    --delay=*) DELAY_ARG=${1#*=}; shift ;;
    --log-level) need_value $# "$1"; LOG_LEVEL_ARG=$2; shift 2 ;;
    --log-level=*) LOG_LEVEL_ARG=${1#*=}; shift ;;
    --log-format) need_value $# "$1"; LOG_FORMAT_ARG=$2; shift 2 ;;
    --log-format=*) LOG_FORMAT_ARG=${1#*=}; shift ;;
    --gateway-regions) need_value $# "$1"; GATEWAY_REGIONS_ARG=$2 GATEWAY_REGIONS_GIVEN=yes; shift 2 ;;
    --gateway-regions=*) GATEWAY_REGIONS_ARG=${1#*=} GATEWAY_REGIONS_GIVEN=yes; shift ;;
    --min-refresh-interval) need_value $# "$1"; MIN_INTERVAL_ARG=$2 MIN_INTERVAL_GIVEN=yes; shift 2 ;;
    --min-refresh-interval=*) MIN_INTERVAL_ARG=${1#*=} MIN_INTERVAL_GIVEN=yes; shift ;;
    --allow-short-refresh-interval) ALLOW_SHORT_ARG=true ALLOW_SHORT_OPTION=true; shift ;;
    --migrate) MIGRATE=true; shift ;;
    --arch) need_value $# "$1"; ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#*=}; shift ;;
    --alarm-topic) need_value $# "$1"; ALARM_TOPIC_ARG=$2 ALARM_TOPIC_GIVEN=yes; shift 2 ;;
    --alarm-topic=*) ALARM_TOPIC_ARG=${1#*=} ALARM_TOPIC_GIVEN=yes; shift ;;
    --region) need_value $# "$1"; REGION_FLAG=$2; shift 2 ;;
    --region=*) REGION_FLAG=${1#*=}; shift ;;
    --) shift; BUCKETS+=("$@"); break ;;
    -*) usage_error "unknown option $1" ;;
    *) BUCKETS+=("$1"); shift ;;
  esac
done
if [ "${#BUCKETS[@]}" -eq 0 ] && [ -n "${S3EA_BUCKETS:-}" ]; then
  read -r -a BUCKETS <<<"$S3EA_BUCKETS"
fi
[ "${#BUCKETS[@]}" -gt 0 ] || usage_error "missing BUCKET"

check_prefix "$PREFIX_ARG"
if [ -n "$ALARM_TOPIC_GIVEN" ]; then check_alarm_topic "$ALARM_TOPIC_ARG"; fi
if [ -n "$INGEST_GIVEN" ]; then INGEST_ARG=$(check_ingest "$INGEST_ARG"); fi
for bucket in "${BUCKETS[@]}"; do check_bucket "$bucket"; done
if [ -n "$DELAY_ARG" ]; then
  case $DELAY_ARG in
    *[!0-9]*) usage_error "invalid --delay '$DELAY_ARG': a whole number of seconds from 0 to 43200" ;;
  esac
  DELAY_ARG=$((10#$DELAY_ARG))
  [ "$DELAY_ARG" -le 43200 ] || usage_error "invalid --delay '$DELAY_ARG': a whole number of seconds from 0 to 43200"
fi
if [ -n "$LOG_LEVEL_ARG" ]; then
  LOG_LEVEL_ARG=$(printf '%s' "$LOG_LEVEL_ARG" | tr '[:lower:]' '[:upper:]')
  case $LOG_LEVEL_ARG in
    DEBUG | INFO | WARN | WARNING | ERROR) ;;
    *) usage_error "invalid --log-level '$LOG_LEVEL_ARG': DEBUG, INFO, WARN (or WARNING) or ERROR" ;;
  esac
fi
if [ -n "$LOG_FORMAT_ARG" ]; then
  LOG_FORMAT_ARG=$(printf '%s' "$LOG_FORMAT_ARG" | tr '[:upper:]' '[:lower:]')
  case $LOG_FORMAT_ARG in
    json | text) ;;
    *) usage_error "invalid --log-format '$LOG_FORMAT_ARG': json or text" ;;
  esac
fi
# check_gateway_regions VALUE: VALUE without the spaces around its entries, or a usage
# error. The same rule as the refresher's (shared/src/config.rs): a comma-separated
# list of distinct region names, each like us-east-1, us-gov-west-1 or ap-southeast-5.
check_gateway_regions() {
  # ASCII ranges whatever the locale.
  local LC_ALL=C rest="$1," entry seen=, region_re='^[a-z]{2}(-[a-z]+)+-[0-9]+$'
  while [ -n "$rest" ]; do
    entry=${rest%%,*} rest=${rest#*,}
    entry=${entry#"${entry%%[![:space:]]*}"} entry=${entry%"${entry##*[![:space:]]}"}
    if ! [[ $entry =~ $region_re ]] || [[ $seen == *",$entry,"* ]]; then
      usage_error "invalid --gateway-regions '$1': a comma-separated list of distinct AWS region names such as us-east-1,eu-west-2"
    fi
    seen="$seen$entry,"
  done
  seen=${seen#,}
  printf '%s' "${seen%,}"
}
if [ -n "$GATEWAY_REGIONS_GIVEN" ]; then GATEWAY_REGIONS_ARG=$(check_gateway_regions "$GATEWAY_REGIONS_ARG"); fi
if [ -n "$MIN_INTERVAL_GIVEN" ]; then
  case $MIN_INTERVAL_ARG in
    "" | *[!0-9]*) usage_error "invalid --min-refresh-interval '$MIN_INTERVAL_ARG': a whole number of seconds from 0 to 3600" ;;
  esac
  # Without its leading zeros, more than 4 digits cannot be in range (and could
  # overflow the shell's arithmetic).
  MIN_INTERVAL_VALUE=$(printf '%s' "$MIN_INTERVAL_ARG" | sed 's/^0*//')
  if [ "${#MIN_INTERVAL_VALUE}" -gt 4 ] || [ "$((10#${MIN_INTERVAL_VALUE:-0}))" -gt 3600 ]; then
    usage_error "invalid --min-refresh-interval '$MIN_INTERVAL_ARG': a whole number of seconds from 0 to 3600"
  fi
  MIN_INTERVAL_ARG=$((10#${MIN_INTERVAL_VALUE:-0}))
fi
# The acknowledgement of an interval below 60 s (docs/deployment.md, "Refresh
# intervals below 60 seconds"): the API
# reference says that a RefreshCache within 60 s of the previous one may not evict the
# cached entries, so deleted objects may stay visible on the share.
SHORT_INTERVAL_ACK=false
if [ -n "$ALLOW_SHORT_ARG" ]; then
  case $(printf '%s' "$ALLOW_SHORT_ARG" | tr '[:upper:]' '[:lower:]') in
    true) SHORT_INTERVAL_ACK=true ;;
    false) ;;
    *) usage_error "invalid ALLOW_SHORT_REFRESH_INTERVAL '$ALLOW_SHORT_ARG': true or false" ;;
  esac
fi
if [ -n "$MIN_INTERVAL_GIVEN" ] && [ "$MIN_INTERVAL_ARG" -lt 60 ] && ! $SHORT_INTERVAL_ACK; then
  usage_error "--min-refresh-interval $MIN_INTERVAL_ARG is below 60 s, where a RefreshCache may not evict cached entries (deletes may stay visible on the share): pass --allow-short-refresh-interval (or ALLOW_SHORT_REFRESH_INTERVAL=true) to accept that"
fi
if $MIGRATE && [ "$PREFIX_ARG" != "$DEFAULT_PREFIX" ]; then
  usage_error "--migrate takes a 2018 deployment over into the stack of the default prefix $DEFAULT_PREFIX, whose names it shares (its table, queue and function); --prefix $PREFIX_ARG cannot be used with it"
fi
case $ARCH in
  arm64) BUILD_ARCH_FLAG=--arm64 RUST_TARGET=aarch64-unknown-linux-gnu ;;
  x86_64) BUILD_ARCH_FLAG=--x86-64 RUST_TARGET=x86_64-unknown-linux-gnu ;;
  *) usage_error "invalid --arch '$ARCH': arm64 or x86_64" ;;
esac
BILLING_MODE=${S3EA_BILLING_MODE:-on-demand}
case $BILLING_MODE in
  on-demand | PAY_PER_REQUEST) BILLING_MODE=PAY_PER_REQUEST ;;
  provisioned | PROVISIONED) BILLING_MODE=PROVISIONED ;;
  *) usage_error "invalid S3EA_BILLING_MODE '$BILLING_MODE': on-demand or provisioned" ;;
esac
READ_CAPACITY=${S3EA_READ_CAPACITY:-1}
WRITE_CAPACITY=${S3EA_WRITE_CAPACITY:-5}
DEPLOY_TOOL=${S3EA_DEPLOY_TOOL:-cargo-lambda}
case $DEPLOY_TOOL in
  cargo-lambda | aws-cli) ;;
  *) usage_error "invalid S3EA_DEPLOY_TOOL '$DEPLOY_TOOL': cargo-lambda or aws-cli" ;;
esac

set_names "$PREFIX_ARG"

# ---------------------------------------------------------------------------------
# Tools and target

command -v aws >/dev/null 2>&1 || die "the AWS CLI is not installed (pip install awscli)"
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (https://rustup.rs)"
cargo lambda --version >/dev/null 2>&1 || die "cargo-lambda is not installed (pip install cargo-lambda)"
resolve_target "$REGION_FLAG"
if [ -n "$ALARM_TOPIC_GIVEN" ]; then
  step "Alarm topic $ALARM_TOPIC_ARG"
  check_topic_exists "$ALARM_TOPIC_ARG"
fi

# The ingest mode: --ingest, else the one the stack records, else direct. Besides that
# mode's resources, the run also keeps the resources of any other mode that the stack
# has, up to date: buckets that are not named here may still use them.
load_recorded_ingest
if [ -n "$INGEST_ARG" ]; then
  INGEST=$INGEST_ARG source="--ingest"
elif [ -n "$RECORDED_INGEST" ]; then
  INGEST=$RECORDED_INGEST source="recorded on $AGGREGATOR_FUNCTION"
else
  INGEST=direct source="the default"
fi
case $INGEST in
  direct | sqs | eventbridge) ;;
  *) die "the aggregator's tag $INGEST_TAG has the value '$INGEST': pass --ingest ($INGEST_MODES)" ;;
esac
WITH_SQS=false WITH_EVENTBRIDGE=false
if [ "$INGEST" = sqs ] || find_ingest_queue; then WITH_SQS=true; fi
if [ "$INGEST" = eventbridge ] || rule_exists; then WITH_EVENTBRIDGE=true; fi
step "Ingest: $INGEST ($source)"
if [ -n "$RECORDED_INGEST" ] && [ "$RECORDED_INGEST" != "$INGEST" ]; then
  info "the stack was created with $RECORDED_INGEST: the given buckets move to $INGEST, and buckets attached with $RECORDED_INGEST keep it until you attach them again"
fi

step "Checking the buckets: ${BUCKETS[*]}"
for bucket in "${BUCKETS[@]}"; do require_bucket "$bucket"; done

# A deployment of the 2018 scripts (scripts/lib/takeover.sh): before anything changes,
# and before the build. Without --migrate the run stops here; with it, every bucket
# that the 2018 deployment serves must be named, so that none loses its events.
step "Looking for a deployment of the 2018 scripts"
find_legacy "${BUCKETS[@]}"
TAKEOVER=false
if ! $LEGACY_FOUND; then
  if $MIGRATE; then
    info "none found: nothing to take over (--migrate is a plain run now)"
  else
    info "none found"
  fi
else
  all_buckets=$(printf '%s\n' "${BUCKETS[@]}" ${LEGACY_BUCKETS[@]+"${LEGACY_BUCKETS[@]}"} | sort -u | tr '\n' ' ' | sed 's/ $//')
  if ! $MIGRATE; then
    print_legacy migrate " (--migrate does what each line says)"
    if [ "$PREFIX" != "$DEFAULT_PREFIX" ]; then
      die "a deployment of the 2018 scripts exists here (above), and nothing was changed. It shares its names with the stack of the default prefix: take it over with scripts/create-stack.sh --migrate $all_buckets (without --prefix), then create this stack"
    fi
    die "a deployment of the 2018 scripts exists here (above), and nothing was changed. Take it over with: scripts/create-stack.sh --migrate $all_buckets"
  fi
  print_legacy migrate ": taking it over (--migrate)"
  missing=$(legacy_missing_buckets "${BUCKETS[@]}")
  if [ -n "$missing" ]; then
    die "the 2018 deployment also serves $missing, which this run does not name; nothing was changed. Name every one of its buckets, so that none loses its events: scripts/create-stack.sh --migrate $all_buckets"
  fi
  # shellcheck disable=SC2034 # read by scripts/lib/stack.sh (ensure_notifications)
  TAKEOVER=true DROP_LEGACY_ENTRY=true
fi

# ---------------------------------------------------------------------------------
# The refresher's settings, read before the build, so that a run that cannot go on
# stops before it changes anything.
#
# MIN_INTERVAL: --min-refresh-interval, else the function's current value, else 60.
# Below 60 it needs the acknowledgement: --allow-short-refresh-interval (or
# ALLOW_SHORT_REFRESH_INTERVAL=true) with --min-refresh-interval (checked above); an
# interval kept from the function is acknowledged by the function's own
# ALLOW_SHORT_REFRESH_INTERVAL=true. GATEWAY_REGIONS_VALUE: --gateway-regions, else the
# function's current value (PREVIOUS_GATEWAY_REGIONS), else none (its own region).

CURRENT_INTERVAL='' CURRENT_ALLOW='' PREVIOUS_GATEWAY_REGIONS=''
if aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$REFRESHER_FUNCTION" \
  --query 'Environment.Variables.[MIN_REFRESH_INTERVAL_SECONDS, ALLOW_SHORT_REFRESH_INTERVAL, GATEWAY_REGIONS]' --output text; then
  IFS=$'\t' read -r CURRENT_INTERVAL CURRENT_ALLOW PREVIOUS_GATEWAY_REGIONS <<<"$AWS_OUT"
  [ "${CURRENT_INTERVAL:-None}" != None ] || CURRENT_INTERVAL=
  [ "${CURRENT_ALLOW:-None}" != None ] || CURRENT_ALLOW=
  [ "${PREVIOUS_GATEWAY_REGIONS:-None}" != None ] || PREVIOUS_GATEWAY_REGIONS=
fi
if [ -n "$MIN_INTERVAL_GIVEN" ]; then
  MIN_INTERVAL=$MIN_INTERVAL_ARG MIN_INTERVAL_SOURCE="--min-refresh-interval"
elif [ -n "$CURRENT_INTERVAL" ]; then
  MIN_INTERVAL=$CURRENT_INTERVAL MIN_INTERVAL_SOURCE="the function's current MIN_REFRESH_INTERVAL_SECONDS, kept"
else
  MIN_INTERVAL=60 MIN_INTERVAL_SOURCE="the default"
fi
SHORT_INTERVAL=false SHORT_INTERVAL_SOURCE=
if [[ $MIN_INTERVAL =~ ^[0-9]+$ ]] && [ "$((10#$MIN_INTERVAL))" -lt 60 ]; then
  SHORT_INTERVAL=true
  if $SHORT_INTERVAL_ACK; then
    if $ALLOW_SHORT_OPTION; then
      SHORT_INTERVAL_SOURCE="--allow-short-refresh-interval"
    else
      SHORT_INTERVAL_SOURCE="ALLOW_SHORT_REFRESH_INTERVAL=true"
    fi
  elif [ "$(printf '%s' "$CURRENT_ALLOW" | tr '[:upper:]' '[:lower:]')" = true ]; then
    SHORT_INTERVAL_SOURCE="the function's current ALLOW_SHORT_REFRESH_INTERVAL, kept"
  else
    die "the refresher's current MIN_REFRESH_INTERVAL_SECONDS is $MIN_INTERVAL, below 60 s, and it has no ALLOW_SHORT_REFRESH_INTERVAL=true: pass --allow-short-refresh-interval to keep it, or --min-refresh-interval 60 or more. Nothing was changed"
  fi
fi
GATEWAY_REGIONS_VALUE=${GATEWAY_REGIONS_ARG:-$PREVIOUS_GATEWAY_REGIONS}
EXTRA_REGIONS=$(extra_gateway_regions "$GATEWAY_REGIONS_VALUE")
step "Rule $COMPLETION_RULE: checking that the name is free for this stack in $REGION${EXTRA_REGIONS:+ and in $EXTRA_REGIONS}"
# shellcheck disable=SC2086 # one argument per region
check_completion_rules $EXTRA_REGIONS
info "it is"

# ---------------------------------------------------------------------------------
# Build

LAMBDA_DIR=${CARGO_TARGET_DIR:-$S3EA_ROOT/target}/lambda
build_functions() {
  local bin
  if [ "${S3EA_SKIP_BUILD:-}" = 1 ]; then
    step "Not building (S3EA_SKIP_BUILD=1): deploying $LAMBDA_DIR/{aggregator,refresher}/bootstrap.zip as they are"
    for bin in aggregator refresher; do
      [ -s "$LAMBDA_DIR/$bin/bootstrap.zip" ] || die "$LAMBDA_DIR/$bin/bootstrap.zip is missing: build it, or unset S3EA_SKIP_BUILD"
    done
    return
  fi
  if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$RUST_TARGET"; then
    step "Adding the Rust target $RUST_TARGET"
    rustup target add "$RUST_TARGET"
  fi
  step "Building: cargo lambda build --release $BUILD_ARCH_FLAG --output-format zip -p aggregator -p refresher"
  (cd "$S3EA_ROOT" && cargo lambda build --release "$BUILD_ARCH_FLAG" --output-format zip \
    --package aggregator --package refresher)
  for bin in aggregator refresher; do
    [ -s "$LAMBDA_DIR/$bin/bootstrap.zip" ] || die "the build did not produce $LAMBDA_DIR/$bin/bootstrap.zip"
  done
}
build_functions

# ---------------------------------------------------------------------------------
# DynamoDB

ensure_table() {
  step "DynamoDB table $TABLE_NAME"
  if aws_maybe 'ResourceNotFoundException' dynamodb describe-table --table-name "$TABLE_NAME" \
    --query "Table.[KeySchema[0].AttributeName, KeySchema[0].KeyType, length(KeySchema), AttributeDefinitions[?AttributeName=='BucketName'].AttributeType | [0], BillingModeSummary.BillingMode]" \
    --output text; then
    local key type count attr mode
    read -r key type count attr mode <<<"$AWS_OUT"
    if [ "$key $type $count $attr" != "BucketName HASH 1 S" ]; then
      die "table $TABLE_NAME exists with another key schema; it needs the hash key BucketName (S) only"
    fi
    [ "$mode" != None ] || mode=PROVISIONED # tables that were never switched report no mode
    if [ "$mode" = "$BILLING_MODE" ]; then
      info "exists (hash key BucketName, $mode)"
    else
      info "exists with $mode: switching to $BILLING_MODE"
      if [ "$BILLING_MODE" = PROVISIONED ]; then
        aws_maybe 'LimitExceeded' dynamodb update-table --table-name "$TABLE_NAME" --billing-mode PROVISIONED \
          --provisioned-throughput "ReadCapacityUnits=$READ_CAPACITY,WriteCapacityUnits=$WRITE_CAPACITY" ||
          warn "DynamoDB refused the switch for now (one switch per 24 hours): table left as $mode"
      else
        aws_maybe 'LimitExceeded' dynamodb update-table --table-name "$TABLE_NAME" --billing-mode PAY_PER_REQUEST ||
          warn "DynamoDB refused the switch for now (one switch per 24 hours): table left as $mode"
      fi
    fi
  else
    info "creating (hash key BucketName, $BILLING_MODE)"
    local capacity=()
    if [ "$BILLING_MODE" = PROVISIONED ]; then
      capacity=(--provisioned-throughput "ReadCapacityUnits=$READ_CAPACITY,WriteCapacityUnits=$WRITE_CAPACITY")
    fi
    aws_cli dynamodb create-table --table-name "$TABLE_NAME" \
      --attribute-definitions AttributeName=BucketName,AttributeType=S \
      --key-schema AttributeName=BucketName,KeyType=HASH \
      --billing-mode "$BILLING_MODE" "${capacity[@]}" >/dev/null
  fi
  aws_cli dynamodb wait table-exists --table-name "$TABLE_NAME"
}

# ---------------------------------------------------------------------------------
# SQS

# ensure_queue NAME ATTRIBUTES_JSON: creates the queue, or sets the attributes of the
# existing one. Sets QUEUE_URL_OUT.
ensure_queue() {
  local name=$1 attributes=$2 tries=0
  step "SQS queue $name"
  if aws_maybe 'NonExistentQueue|QueueDoesNotExist' sqs get-queue-url --queue-name "$name" --query QueueUrl --output text; then
    QUEUE_URL_OUT=$AWS_OUT
    info "exists: setting its attributes"
    aws_cli sqs set-queue-attributes --queue-url "$QUEUE_URL_OUT" --attributes "$attributes"
    return
  fi
  info "creating"
  # SQS refuses a name for 60 seconds after a queue of that name was deleted.
  until aws_maybe 'QueueDeletedRecently' sqs create-queue --queue-name "$name" --attributes "$attributes" \
    --query QueueUrl --output text; do
    tries=$((tries + 1))
    [ "$tries" -lt 15 ] || die "queue $name: SQS still refuses the name of a recently deleted queue"
    info "a queue of this name was deleted less than 60 s ago; retrying in 5 s"
    sleep 5
  done
  QUEUE_URL_OUT=$AWS_OUT
}

ensure_queues() {
  local sse='"SqsManagedSseEnabled":"true"' redrive
  ensure_queue "$ACTION_DLQ" "{$sse,\"MessageRetentionPeriod\":\"$DLQ_RETENTION_SECONDS\"}"
  URL_ACTION_DLQ=$QUEUE_URL_OUT
  redrive="{\\\"deadLetterTargetArn\\\":\\\"$ACTION_DLQ_ARN\\\",\\\"maxReceiveCount\\\":$ACTION_MAX_RECEIVE_COUNT}"
  # The action queue's policy (scripts/lib/completion.sh) is set with its other
  # attributes: its current statements are read first and kept, and ours is put in
  # by Sid. (moto drops a policy that set-queue-attributes does not name.)
  load_action_queue_policy
  ensure_queue "$ACTION_QUEUE" "{$sse,\"VisibilityTimeout\":\"$ACTION_VISIBILITY_TIMEOUT\",\"MessageRetentionPeriod\":\"$ACTION_RETENTION_SECONDS\",\"RedrivePolicy\":\"$redrive\",$(action_queue_policy_attribute)}"
  info "policy: $ACTION_QUEUE_POLICY_NOTE"
  URL_ACTION_QUEUE=$QUEUE_URL_OUT
  ensure_queue "$AGGREGATOR_DLQ" "{$sse,\"MessageRetentionPeriod\":\"$DLQ_RETENTION_SECONDS\"}"
  URL_AGGREGATOR_DLQ=$QUEUE_URL_OUT
  if $WITH_SQS; then
    ensure_queue "$INGEST_DLQ" "{$sse,\"MessageRetentionPeriod\":\"$DLQ_RETENTION_SECONDS\"}"
    URL_INGEST_DLQ=$QUEUE_URL_OUT
    # The ingest queue's policy lets S3 send the events of the attached buckets; each
    # attach_bucket (scripts/lib/stack.sh) adds its bucket. The buckets it names now are
    # kept, and the policy is written again after the attributes, from the current
    # template. (SQS keeps a policy that set-queue-attributes does not name; moto drops
    # it, and this also covers that.)
    local kept=()
    if find_ingest_queue; then
      load_queue_policy_buckets
      kept=(${QUEUE_POLICY_BUCKETS[@]+"${QUEUE_POLICY_BUCKETS[@]}"})
    fi
    redrive="{\\\"deadLetterTargetArn\\\":\\\"$INGEST_DLQ_ARN\\\",\\\"maxReceiveCount\\\":$INGEST_MAX_RECEIVE_COUNT}"
    ensure_queue "$INGEST_QUEUE" "{$sse,\"VisibilityTimeout\":\"$INGEST_VISIBILITY_TIMEOUT\",\"MessageRetentionPeriod\":\"$INGEST_RETENTION_SECONDS\",\"RedrivePolicy\":\"$redrive\"}"
    URL_INGEST_QUEUE=$QUEUE_URL_OUT
    # shellcheck disable=SC2034 # read by scripts/lib/stack.sh
    INGEST_QUEUE_URL=$QUEUE_URL_OUT
    if [ "${#kept[@]}" -gt 0 ]; then
      info "writing its policy again (iam/ingest-queue-policy.json), for the buckets it names: ${kept[*]}"
      write_queue_policy "${kept[@]}"
    fi
  fi
}

# ---------------------------------------------------------------------------------
# IAM

# Documents are compared without their white space: the templates have no spaces
# inside their strings, and IAM returns a document with its keys in their order.
same_document() {
  [ "$(printf '%s' "$1" | tr -d '[:space:]')" = "$(printf '%s' "$2" | tr -d '[:space:]')" ]
}

ensure_role() {
  local role=$1 trust
  trust=$(render_policy "$S3EA_ROOT/iam/lambda-trust.json" "")
  step "IAM role $role"
  if aws_maybe 'NoSuchEntity' iam get-role --role-name "$role" --query Role.AssumeRolePolicyDocument --output json; then
    if same_document "$AWS_OUT" "$trust"; then
      info "exists, trust policy up to date"
    else
      info "exists: updating its trust policy"
      aws_cli iam update-assume-role-policy --role-name "$role" --policy-document "$trust"
    fi
  else
    info "creating (trusted by lambda.amazonaws.com)"
    aws_cli iam create-role --role-name "$role" --assume-role-policy-document "$trust" \
      --description "s3-event-aggregator ($PREFIX): execution role" >/dev/null
  fi
}

# ensure_policy NAME ARN TEMPLATE FUNCTION ROLE: the customer managed policy with the
# rendered template as its default version, attached to the role.
ensure_policy() {
  local name=$1 arn=$2 template=$3 function=$4 role=$5 document current versions oldest
  document=$(render_policy "$S3EA_ROOT/iam/$template" "$function")
  step "IAM policy $name (iam/$template)"
  if aws_maybe 'NoSuchEntity' iam get-policy --policy-arn "$arn" --query Policy.DefaultVersionId --output text; then
    current=$(aws_cli iam get-policy-version --policy-arn "$arn" --version-id "$AWS_OUT" \
      --query PolicyVersion.Document --output json)
    if same_document "$current" "$document"; then
      info "exists, document up to date"
    else
      # A policy keeps at most 5 versions: drop the oldest non-default one first.
      versions=$(aws_cli iam list-policy-versions --policy-arn "$arn" --query 'length(Versions)' --output text)
      if [ "$versions" -ge 5 ]; then
        # shellcheck disable=SC2016 # JMESPath literals
        oldest=$(aws_cli iam list-policy-versions --policy-arn "$arn" \
          --query 'sort_by(Versions[?IsDefaultVersion == `false`], &CreateDate)[0].VersionId' --output text)
        info "deleting its oldest version $oldest"
        aws_cli iam delete-policy-version --policy-arn "$arn" --version-id "$oldest"
      fi
      info "exists: adding the new document as the default version"
      aws_cli iam create-policy-version --policy-arn "$arn" --policy-document "$document" --set-as-default >/dev/null
    fi
  else
    info "creating"
    aws_cli iam create-policy --policy-name "$name" --policy-document "$document" \
      --description "s3-event-aggregator ($PREFIX): $function" >/dev/null
  fi
  if [ "$(aws_cli iam list-attached-role-policies --role-name "$role" \
    --query "length(AttachedPolicies[?PolicyArn == '$arn'])" --output text)" = 1 ]; then
    info "attached to role $role"
  else
    info "attaching to role $role"
    aws_cli iam attach-role-policy --role-name "$role" --policy-arn "$arn"
  fi
}

# ---------------------------------------------------------------------------------
# CloudWatch Logs: the functions' log groups, created here so that they have a
# retention period (Lambda would create them without one) and so that delete-stack
# can remove them.

ensure_log_group() {
  local group=/aws/lambda/$1 found
  step "Log group $group (retention $LOG_RETENTION_DAYS days)"
  found=$(aws_cli logs describe-log-groups --log-group-name-prefix "$group" \
    --query "length(logGroups[?logGroupName == '$group'])" --output text)
  if [ "$found" = 0 ]; then
    info "creating"
    aws_cli logs create-log-group --log-group-name "$group"
  else
    info "exists"
  fi
  aws_cli logs put-retention-policy --log-group-name "$group" --retention-in-days "$LOG_RETENTION_DAYS"
}

# ---------------------------------------------------------------------------------
# Lambda functions

# current_env FUNCTION VARIABLE: the variable's value on the existing function, or
# nothing.
current_env() {
  local value
  value=$(aws_cli lambda get-function-configuration --function-name "$1" \
    --query "Environment.Variables.$2" --output text)
  [ "$value" = None ] || printf '%s' "$value"
}

wait_function_ready() {
  aws_cli lambda wait function-active --function-name "$1"
  aws_cli lambda wait function-updated --function-name "$1"
}

# environment_json KEY=VALUE...: the --environment argument, as JSON (values may hold
# commas, which the shorthand syntax would split).
environment_json() {
  local kv value json='{"Variables":{' separator=
  for kv in "$@"; do
    value=$(printf '%s' "${kv#*=}" | sed 's/[\\"]/\\&/g')
    json="$json$separator\"${kv%%=*}\":\"$value\""
    separator=,
  done
  printf '%s}}' "$json"
}

# Our variables; any other variable of a function is the operator's, and stays.
OUR_VARIABLES=" QUEUE_URL REFRESH_DELAY_SECONDS LOG_LEVEL TABLE_NAME GATEWAY_REGIONS MIN_REFRESH_INTERVAL_SECONDS ALLOW_SHORT_REFRESH_INTERVAL "

# merge_foreign_env FUNCTION KEY=VALUE...: MERGED_ENV, the given variables and the
# existing function's variables that are not ours (each one said).
merge_foreign_env() {
  local name=$1 keys key value
  shift
  MERGED_ENV=("$@")
  # shellcheck disable=SC2016 # JMESPath literal
  keys=$(aws_cli lambda get-function-configuration --function-name "$name" \
    --query 'keys(Environment.Variables || `{}`)' --output text)
  for key in $keys; do
    case $OUR_VARIABLES in
      *" $key "*) ;;
      *)
        value=$(aws_cli lambda get-function-configuration --function-name "$name" \
          --query "Environment.Variables.\"$key\"" --output text)
        MERGED_ENV+=("$key=$value")
        info "keeping the variable $key"
        ;;
    esac
  done
}

# sync_our_variables FUNCTION KEY=VALUE...: makes the function's variables of ours
# exactly KEY=VALUE... after a `cargo lambda deploy`, which may not: with the crates'
# merge_env it keeps every variable that it is not given (so one of ours that this run
# drops, such as ALLOW_SHORT_REFRESH_INTERVAL, stays), and the crates' own env
# (TABLE_NAME = "S3EventAggregator") wins over an --env-file (deploy_function passes
# such values with --env-var too). The variables that are not ours stay.
sync_our_variables() {
  local name=$1 keys key kv value wrong=()
  shift
  # shellcheck disable=SC2016 # JMESPath literal
  keys=$(aws_cli lambda get-function-configuration --function-name "$name" \
    --query 'keys(Environment.Variables || `{}`)' --output text)
  for key in $keys; do
    case $OUR_VARIABLES in
      *" $key "*) if ! printf '%s\n' "$@" | grep -q "^$key="; then wrong+=("$key (not set by this run)"); fi ;;
    esac
  done
  for kv in "$@"; do
    value=$(aws_cli lambda get-function-configuration --function-name "$name" \
      --query "Environment.Variables.\"${kv%%=*}\"" --output text)
    [ "$value" = "${kv#*=}" ] || wrong+=("${kv%%=*} (was ${value/#None/not set})")
  done
  [ "${#wrong[@]}" -gt 0 ] || return 0
  info "correcting what cargo lambda deploy left: ${wrong[*]}"
  merge_foreign_env "$name" "$@"
  aws_cli lambda update-function-configuration --function-name "$name" \
    --environment "$(environment_json "${MERGED_ENV[@]}")" >/dev/null
  wait_function_ready "$name"
}

# deploy_function NAME BINARY ROLE_ARN TIMEOUT MEMORY KEY=VALUE...
deploy_function() {
  local name=$1 binary=$2 role=$3 timeout=$4 memory=$5 exists=false current_arch
  shift 5
  local env_vars=("$@") zip="$LAMBDA_DIR/$binary/bootstrap.zip"
  step "Lambda function $name (binary $binary, $ARCH, ${timeout}s, ${memory} MB, $DEPLOY_TOOL)"
  info "environment: ${env_vars[*]}"
  if function_exists "$name"; then
    exists=true
    wait_function_ready "$name"
    current_arch=$(aws_cli lambda get-function-configuration --function-name "$name" \
      --query 'Architectures[0]' --output text)
    if [ "$current_arch" != "$ARCH" ]; then
      # `cargo lambda deploy` updates the code of an existing function but not its
      # architecture; switch both at once here.
      info "switching the architecture from $current_arch to $ARCH"
      aws_cli lambda update-function-code --function-name "$name" --architectures "$ARCH" \
        --zip-file "fileb://$zip" >/dev/null
      wait_function_ready "$name"
    fi
  fi

  if [ "$DEPLOY_TOOL" = cargo-lambda ]; then
    local args=(lambda deploy --binary-name "$binary" --iam-role "$role" --timeout "$timeout"
      --memory "$memory" --region "$REGION" --output-format json)
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then args+=(--endpoint-url "$AWS_ENDPOINT_URL"); fi
    # An env file: cargo lambda splits --env-var values at commas, and GATEWAY_REGIONS
    # holds commas. One KEY=VALUE a line; no value of ours has a newline, quote, '#' or
    # '$'. The crates' own env (TABLE_NAME = "S3EventAggregator") wins over the file,
    # and --env-var wins over both, so every value without a comma goes there too.
    local env_file="$S3EA_TMP/$binary.env" kv
    printf '%s\n' "${env_vars[@]}" >"$env_file"
    args+=(--env-file "$env_file")
    for kv in "${env_vars[@]}"; do
      case ${kv#*=} in
        *,*) ;;
        *) args+=(--env-var "$kv") ;;
      esac
    done
    (cd "$S3EA_ROOT" && retry_for_iam "cargo lambda deploy $name" cargo "${args[@]}" "$name") | sed 's/^/    /'
    wait_function_ready "$name"
    sync_our_variables "$name" "${env_vars[@]}"
  else
    local variables
    if $exists; then
      # Like cargo lambda deploy with merge_env: keep the variables that are not ours.
      merge_foreign_env "$name" "${env_vars[@]}"
      env_vars=("${MERGED_ENV[@]}")
    fi
    variables=$(environment_json "${env_vars[@]}")
    if $exists; then
      info "updating its configuration"
      retry_for_iam "update-function-configuration $name" aws_cli lambda update-function-configuration \
        --function-name "$name" --role "$role" --runtime provided.al2023 --handler bootstrap \
        --timeout "$timeout" --memory-size "$memory" --environment "$variables" >/dev/null
      wait_function_ready "$name"
      info "updating its code"
      aws_cli lambda update-function-code --function-name "$name" --architectures "$ARCH" \
        --zip-file "fileb://$zip" >/dev/null
    else
      info "creating"
      retry_for_iam "create-function $name" aws_cli lambda create-function --function-name "$name" \
        --runtime provided.al2023 --handler bootstrap --architectures "$ARCH" --role "$role" \
        --timeout "$timeout" --memory-size "$memory" --environment "$variables" \
        --zip-file "fileb://$zip" >/dev/null
    fi
  fi
  wait_function_ready "$name"
}

# The configured value: the option or variable, else the function's current value,
# else the default.
setting() { # FUNCTION VARIABLE GIVEN DEFAULT
  local value=$3
  if [ -z "$value" ] && function_exists "$1"; then value=$(current_env "$1" "$2"); fi
  printf '%s' "${value:-$4}"
}

# aggregator_env: AGGREGATOR_ENV, the aggregator's variables. The 2018 aggregator has
# REFRESH_DELAY_SECONDS and LOG_LEVEL too, and keeps their values.
aggregator_env() {
  local delay level
  delay=$(setting "$AGGREGATOR_FUNCTION" REFRESH_DELAY_SECONDS "$DELAY_ARG" 30)
  level=$(setting "$AGGREGATOR_FUNCTION" LOG_LEVEL "$LOG_LEVEL_ARG" INFO)
  AGGREGATOR_ENV=("QUEUE_URL=$URL_ACTION_QUEUE" "REFRESH_DELAY_SECONDS=$delay" "LOG_LEVEL=$level" "TABLE_NAME=$TABLE_NAME")
}

deploy_aggregator() {
  aggregator_env
  deploy_function "$AGGREGATOR_FUNCTION" aggregator "$AGGREGATOR_ROLE_ARN" "$AGGREGATOR_TIMEOUT" \
    "$AGGREGATOR_MEMORY" "${AGGREGATOR_ENV[@]}"
}

# convert_aggregator: a 2018 aggregator becomes ours in place (scripts/lib/takeover.sh).
convert_aggregator() {
  $LEGACY_AGGREGATOR_PYTHON || return 0
  aggregator_env
  merge_foreign_env "$AGGREGATOR_FUNCTION" "${AGGREGATOR_ENV[@]}"
  convert_legacy_aggregator "$(environment_json "${MERGED_ENV[@]}")"
}

deploy_refresher() {
  local refresher_level refresher_env
  refresher_level=$(setting "$REFRESHER_FUNCTION" LOG_LEVEL "$LOG_LEVEL_ARG" INFO)
  # MIN_REFRESH_INTERVAL_SECONDS and GATEWAY_REGIONS: read before the build (above).
  # MIN_INTERVAL is always written out; GATEWAY_REGIONS only once it has a value, so
  # that the refresher uses its own region otherwise. ALLOW_SHORT_REFRESH_INTERVAL=true
  # goes with an interval below 60 s only (it is one of our variables: an interval of
  # 60 or more drops it).
  refresher_env=("LOG_LEVEL=$refresher_level" "TABLE_NAME=$TABLE_NAME" "MIN_REFRESH_INTERVAL_SECONDS=$MIN_INTERVAL")
  if [ -n "$GATEWAY_REGIONS_VALUE" ]; then refresher_env+=("GATEWAY_REGIONS=$GATEWAY_REGIONS_VALUE"); fi
  if $SHORT_INTERVAL; then refresher_env+=("ALLOW_SHORT_REFRESH_INTERVAL=true"); fi
  step "Refresher minimum refresh interval: ${MIN_INTERVAL}s ($MIN_INTERVAL_SOURCE)"
  if $SHORT_INTERVAL; then
    info "below 60 s: ALLOW_SHORT_REFRESH_INTERVAL=true ($SHORT_INTERVAL_SOURCE). A RefreshCache within 60 s of the previous one may not evict the share's cached entries: deleted objects may stay visible"
  elif [ -n "$CURRENT_ALLOW" ]; then
    info "60 s or more: the function's ALLOW_SHORT_REFRESH_INTERVAL goes"
  fi
  if [ -n "$GATEWAY_REGIONS_ARG" ]; then
    step "Refresher gateway regions: $GATEWAY_REGIONS_VALUE (--gateway-regions)"
  elif [ -n "$GATEWAY_REGIONS_VALUE" ]; then
    step "Refresher gateway regions: $GATEWAY_REGIONS_VALUE (the function's current GATEWAY_REGIONS, kept)"
  else
    step "Refresher gateway regions: $REGION only (GATEWAY_REGIONS not set: the function's own region)"
  fi
  deploy_function "$REFRESHER_FUNCTION" refresher "$REFRESHER_ROLE_ARN" "$REFRESHER_TIMEOUT" \
    "$REFRESHER_MEMORY" "${refresher_env[@]}"
}

# ensure_logging_config FUNCTION: the function's Lambda logging configuration, from
# --log-format, else its current format. JSON: the system level WARN drops Lambda's
# START, END and REPORT lines; the application level (AWS_LAMBDA_LOG_LEVEL) is DEBUG
# when the function's LOG_LEVEL is DEBUG, else INFO, never above: Lambda counts a line
# without a level (the EMF metric lines) as INFO and would drop it. LOG_LEVEL, which
# the function honours before AWS_LAMBDA_LOG_LEVEL, makes it quieter.
ensure_logging_config() {
  local name=$1 level format app sys current wanted why=kept note=
  level=$(current_env "$name" LOG_LEVEL)
  read -r format app sys <<<"$(aws_cli lambda get-function-configuration --function-name "$name" \
    --query '[LoggingConfig.LogFormat, LoggingConfig.ApplicationLogLevel, LoggingConfig.SystemLogLevel]' \
    --output text)"
  # None: not reported (moto); AWS always reports the format, Text by default.
  case $format in
    JSON) current="LogFormat=JSON,ApplicationLogLevel=$app,SystemLogLevel=$sys" ;;
    None) current= ;;
    *) current="LogFormat=$format" ;;
  esac
  case $LOG_FORMAT_ARG in
    json) format=JSON sys=WARN why="--log-format json" ;;
    text) format=Text why="--log-format text" ;;
  esac
  case $level in DEBUG) app=DEBUG ;; *) app=INFO ;; esac
  case $format in
    JSON)
      [ "$sys" != None ] || sys=WARN
      [ "$sys" != WARN ] || note=": no START, END and REPORT lines"
      wanted="LogFormat=JSON,ApplicationLogLevel=$app,SystemLogLevel=$sys"
      step "Logging configuration of $name: $wanted ($why; application level from LOG_LEVEL=${level:-INFO}, system level $sys$note)"
      ;;
    *)
      wanted="LogFormat=Text"
      step "Logging configuration of $name: $wanted ($why; Lambda filters nothing and adds START, END and REPORT lines)"
      ;;
  esac
  if [ "$current" = "$wanted" ] || { [ -z "$current" ] && [ -z "$LOG_FORMAT_ARG" ]; }; then
    info "up to date"
    return 0
  fi
  info "updating (was ${current:-not reported})"
  aws_cli lambda update-function-configuration --function-name "$name" --logging-config "$wanted" >/dev/null
  wait_function_ready "$name"
}

ensure_refresher_concurrency() {
  step "Reserved concurrency of $REFRESHER_FUNCTION: $REFRESHER_CONCURRENCY"
  if ! aws_maybe 'ReservedConcurrentExecutions|UnreservedConcurrentExecution|below its minimum' \
    lambda put-function-concurrency --function-name "$REFRESHER_FUNCTION" \
    --reserved-concurrent-executions "$REFRESHER_CONCURRENCY"; then
    warn "the account's concurrency quota is too small to reserve $REFRESHER_CONCURRENCY for $REFRESHER_FUNCTION; the event source mapping still caps it at $REFRESHER_CONCURRENCY"
  fi
}

# The aggregator reserves nothing. A takeover removes the 2018 reservation of 1; a
# reservation that the operator made on our aggregator is said and kept.
ensure_aggregator_concurrency() {
  local reserved
  step "Reserved concurrency of $AGGREGATOR_FUNCTION: none"
  if $TAKEOVER; then
    remove_legacy_concurrency
    return 0
  fi
  reserved=$(aws_cli lambda get-function-concurrency --function-name "$AGGREGATOR_FUNCTION" \
    --query ReservedConcurrentExecutions --output text)
  if [ "$reserved" = None ] || [ -z "$reserved" ]; then
    info "unreserved"
  else
    info "it has a reserved concurrency of $reserved, not set by this script: kept (aws lambda delete-function-concurrency --function-name $AGGREGATOR_FUNCTION removes it)"
  fi
}

ensure_async_config() {
  step "Asynchronous invocation of $AGGREGATOR_FUNCTION: $AGGREGATOR_RETRIES retries, events kept ${AGGREGATOR_MAX_EVENT_AGE}s, then to $AGGREGATOR_DLQ"
  retry_for_iam "put-function-event-invoke-config $AGGREGATOR_FUNCTION" aws_cli lambda put-function-event-invoke-config \
    --function-name "$AGGREGATOR_FUNCTION" --maximum-retry-attempts "$AGGREGATOR_RETRIES" \
    --maximum-event-age-in-seconds "$AGGREGATOR_MAX_EVENT_AGE" \
    --destination-config "{\"OnFailure\":{\"Destination\":\"$AGGREGATOR_DLQ_ARN\"}}" >/dev/null
}

# wait_mapping_settled UUID: until the mapping is not being created or updated.
wait_mapping_settled() {
  local state tries=0
  while :; do
    state=$(aws_cli lambda get-event-source-mapping --uuid "$1" --query State --output text)
    case $state in
      Creating | Updating | Enabling | Disabling) ;;
      *) return 0 ;;
    esac
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || die "event source mapping $1 stays in state $state"
    sleep 2
  done
}

# ensure_mapping FUNCTION QUEUE_ARN SETTING...: the one event source mapping from the
# queue to the function, created or updated with the settings (the options of
# create-event-source-mapping and update-event-source-mapping alike). Sets MAPPING_OUT.
ensure_mapping() {
  local function=$1 queue_arn=$2 uuids uuid extra
  shift 2
  uuids=$(aws_cli lambda list-event-source-mappings --function-name "$function" \
    --event-source-arn "$queue_arn" --query "EventSourceMappings[?State != 'Deleting'].UUID" --output text)
  [ "$uuids" != None ] || uuids=
  read -r uuid extra <<<"$uuids" || true
  if [ -n "${extra:-}" ]; then
    for extra in $extra; do
      info "deleting the duplicate mapping $extra"
      aws_cli lambda delete-event-source-mapping --uuid "$extra" >/dev/null
    done
  fi
  if [ -n "${uuid:-}" ]; then
    info "exists ($uuid): updating it"
    wait_mapping_settled "$uuid"
    retry_for_iam "update-event-source-mapping" aws_cli lambda update-event-source-mapping --uuid "$uuid" \
      --enabled "$@" >/dev/null
  else
    info "creating"
    retry_for_iam "create-event-source-mapping" aws_cli lambda create-event-source-mapping \
      --function-name "$function" --event-source-arn "$queue_arn" \
      --enabled "$@" --query UUID --output text >"$S3EA_TMP/uuid"
    uuid=$(cat "$S3EA_TMP/uuid")
  fi
  MAPPING_OUT=$uuid
}

ensure_event_source_mapping() {
  step "Event source mapping $ACTION_QUEUE -> $REFRESHER_FUNCTION (batch $REFRESHER_BATCH_SIZE, ReportBatchItemFailures, at most $REFRESHER_CONCURRENCY concurrent)"
  ensure_mapping "$REFRESHER_FUNCTION" "$ACTION_QUEUE_ARN" --batch-size "$REFRESHER_BATCH_SIZE" \
    --function-response-types ReportBatchItemFailures --scaling-config "MaximumConcurrency=$REFRESHER_CONCURRENCY"
  MAPPING_UUID=$MAPPING_OUT
}

# --ingest sqs: the aggregator consumes the ingest queue. Lambda checks the role's SQS
# permissions (the ingest policy) when the mapping is created.
ensure_ingest_mapping() {
  step "Event source mapping $INGEST_QUEUE -> $AGGREGATOR_FUNCTION (batch $INGEST_BATCH_SIZE, window ${INGEST_BATCH_WINDOW}s, ReportBatchItemFailures)"
  ensure_mapping "$AGGREGATOR_FUNCTION" "$INGEST_QUEUE_ARN" --batch-size "$INGEST_BATCH_SIZE" \
    --maximum-batching-window-in-seconds "$INGEST_BATCH_WINDOW" --function-response-types ReportBatchItemFailures
  INGEST_MAPPING_UUID=$MAPPING_OUT
}

# --ingest eventbridge: the rule (its pattern keeps the buckets it names), the aggregator
# DLQ's policy that lets EventBridge send the events it could not deliver, the target,
# and the aggregator's permission for the rule.
ensure_rule() {
  local failed
  step "EventBridge rule $EVENT_RULE -> $AGGREGATOR_FUNCTION (retried up to ${EVENTBRIDGE_MAX_EVENT_AGE}s, then to $AGGREGATOR_DLQ)"
  RULE_BUCKETS=()
  if rule_exists; then
    load_rule_buckets
    info "exists (${#RULE_BUCKETS[@]} buckets in its event pattern): updating it"
  else
    info "creating (disabled until a bucket is attached)"
  fi
  write_rule ${RULE_BUCKETS[@]+"${RULE_BUCKETS[@]}"}
  info "queue policy of $AGGREGATOR_DLQ: EventBridge may send the rule's undeliverable events (iam/aggregator-dlq-queue-policy.json)"
  set_queue_policy "$URL_AGGREGATOR_DLQ" aggregator-dlq-queue-policy.json
  info "target: $AGGREGATOR_ARN ($EVENTBRIDGE_RETRIES retries, events kept ${EVENTBRIDGE_MAX_EVENT_AGE}s, dead-letter queue $AGGREGATOR_DLQ)"
  failed=$(aws_cli events put-targets --rule "$EVENT_RULE" --targets "[{\"Id\":\"Aggregator\",\"Arn\":\"$AGGREGATOR_ARN\",\"RetryPolicy\":{\"MaximumRetryAttempts\":$EVENTBRIDGE_RETRIES,\"MaximumEventAgeInSeconds\":$EVENTBRIDGE_MAX_EVENT_AGE},\"DeadLetterConfig\":{\"Arn\":\"$AGGREGATOR_DLQ_ARN\"}}]" \
    --query FailedEntryCount --output text)
  [ "$failed" = 0 ] || die "EventBridge did not accept the target of rule $EVENT_RULE"
  load_function_policy
  if has_sid "$EVENTBRIDGE_SID"; then
    info "permission $EVENTBRIDGE_SID: present"
  else
    info "permission $EVENTBRIDGE_SID: adding (principal events.amazonaws.com, source $EVENT_RULE_ARN)"
    aws_cli lambda add-permission --function-name "$AGGREGATOR_FUNCTION" --statement-id "$EVENTBRIDGE_SID" \
      --action lambda:InvokeFunction --principal events.amazonaws.com --source-arn "$EVENT_RULE_ARN" >/dev/null
  fi
}

record_ingest() {
  step "Recording the ingest mode: tag $INGEST_TAG=$INGEST on $AGGREGATOR_FUNCTION"
  aws_cli lambda tag-resource --resource "$AGGREGATOR_ARN" --tags "$INGEST_TAG=$INGEST"
}

# ---------------------------------------------------------------------------------
# Run

ensure_table
ensure_queues
ensure_role "$AGGREGATOR_ROLE"
ensure_policy "$AGGREGATOR_POLICY" "$AGGREGATOR_POLICY_ARN" aggregator-policy.json "$AGGREGATOR_FUNCTION" "$AGGREGATOR_ROLE"
if $WITH_SQS; then
  ensure_policy "$INGEST_POLICY" "$INGEST_POLICY_ARN" aggregator-ingest-policy.json "$AGGREGATOR_FUNCTION" "$AGGREGATOR_ROLE"
fi
ensure_role "$REFRESHER_ROLE"
ensure_policy "$REFRESHER_POLICY" "$REFRESHER_POLICY_ARN" refresher-policy.json "$REFRESHER_FUNCTION" "$REFRESHER_ROLE"
ensure_log_group "$AGGREGATOR_FUNCTION"
ensure_log_group "$REFRESHER_FUNCTION"
# The refresher and its mapping come first: in a takeover, it reads the action queue
# (the 2018 messages and ours alike) before the 2018 mapping goes, and before the
# aggregator sends messages of our format.
deploy_refresher
ensure_logging_config "$REFRESHER_FUNCTION"
ensure_refresher_concurrency
ensure_event_source_mapping
if $TAKEOVER; then remove_legacy_mappings; fi
# After the 2018 mapping: its function does not read refresh-complete events.
ensure_completion_rule
ensure_completion_forwarding "$GATEWAY_REGIONS_VALUE" "$PREVIOUS_GATEWAY_REGIONS"
if $TAKEOVER; then convert_aggregator; fi
deploy_aggregator
ensure_logging_config "$AGGREGATOR_FUNCTION"
ensure_aggregator_concurrency
ensure_async_config
if $WITH_SQS; then ensure_ingest_mapping; fi
if $WITH_EVENTBRIDGE; then ensure_rule; fi
record_ingest
# In a takeover, each bucket's own grant comes first, then its 2018 entry is replaced
# by ours in one write (DROP_LEGACY_ENTRY), and only then do the 2018 permissions go.
for bucket in "${BUCKETS[@]}"; do attach_bucket "$bucket" "$INGEST"; done
if $TAKEOVER; then
  remove_legacy_permissions
  remove_legacy_refresher
  remove_legacy_iam
  step "The 2018 deployment is taken over: its table $LEGACY_TABLE and queue $LEGACY_QUEUE are the stack's, and its other parts are converted or gone"
fi
# Alarms (with --alarm-topic) and the dashboard: scripts/lib/monitoring.sh.
# Their staleness thresholds come from the functions' REFRESH_DELAY_SECONDS and
# MIN_REFRESH_INTERVAL_SECONDS as deployed.
DEPLOYED_DELAY=$(current_env "$AGGREGATOR_FUNCTION" REFRESH_DELAY_SECONDS)
ensure_alarms "$ALARM_TOPIC_ARG" "$DEPLOYED_DELAY" "$MIN_INTERVAL" "$WITH_SQS"
load_all_attached_buckets
ensure_dashboard "$WITH_SQS" "$DEPLOYED_DELAY" "$MIN_INTERVAL" ${ALL_BUCKETS[@]+"${ALL_BUCKETS[@]}"}

step "Done. The stack (prefix $PREFIX, account $ACCOUNT_ID, region $REGION, ingest $INGEST):"
cat <<EOF
    table            $TABLE_ARN
    action queue     $ACTION_QUEUE_ARN
                     $URL_ACTION_QUEUE
    action DLQ       $ACTION_DLQ_ARN
                     $URL_ACTION_DLQ
    aggregator DLQ   $AGGREGATOR_DLQ_ARN
                     $URL_AGGREGATOR_DLQ
    aggregator       $AGGREGATOR_ARN
      role           $AGGREGATOR_ROLE_ARN
      policy         $AGGREGATOR_POLICY_ARN
      log group      arn:aws:logs:$REGION:$ACCOUNT_ID:log-group:/aws/lambda/$AGGREGATOR_FUNCTION
EOF
if $WITH_SQS; then
  cat <<EOF
      ingest policy  $INGEST_POLICY_ARN
      event source   $INGEST_MAPPING_UUID ($INGEST_QUEUE -> $AGGREGATOR_FUNCTION)
    ingest queue     $INGEST_QUEUE_ARN
                     $URL_INGEST_QUEUE
    ingest DLQ       $INGEST_DLQ_ARN
                     $URL_INGEST_DLQ
EOF
fi
if $WITH_EVENTBRIDGE; then
  cat <<EOF
    rule             $EVENT_RULE_ARN (target $AGGREGATOR_FUNCTION)
EOF
fi
cat <<EOF
    refresher        $REFRESHER_ARN
      role           $REFRESHER_ROLE_ARN
      policy         $REFRESHER_POLICY_ARN
      log group      arn:aws:logs:$REGION:$ACCOUNT_ID:log-group:/aws/lambda/$REFRESHER_FUNCTION
      event source   $MAPPING_UUID ($ACTION_QUEUE -> $REFRESHER_FUNCTION)
    completion rule  $COMPLETION_RULE_ARN (target $ACTION_QUEUE)
EOF
for region in $EXTRA_REGIONS; do
  printf '    forwarding rule  arn:aws:events:%s:%s:rule/%s (target %s, role %s)\n' \
    "$region" "$ACCOUNT_ID" "$COMPLETION_RULE" "$HOME_BUS_ARN" "$FORWARDER_ROLE"
done
load_function_policy
attached_buckets | sed 's/^/    bucket           arn:aws:s3:::/; s/$/ (direct)/'
others=()
if $WITH_SQS; then
  load_queue_policy_buckets
  for bucket in ${QUEUE_POLICY_BUCKETS[@]+"${QUEUE_POLICY_BUCKETS[@]}"}; do
    printf '    bucket           arn:aws:s3:::%s (sqs)\n' "$bucket"
    [ "$INGEST" = sqs ] || others+=("$bucket")
  done
fi
if $WITH_EVENTBRIDGE; then
  load_rule_buckets
  for bucket in ${RULE_BUCKETS[@]+"${RULE_BUCKETS[@]}"}; do
    printf '    bucket           arn:aws:s3:::%s (eventbridge)\n' "$bucket"
    [ "$INGEST" = eventbridge ] || others+=("$bucket")
  done
fi
if [ "$INGEST" != direct ]; then
  while IFS= read -r bucket; do if [ -n "$bucket" ]; then others+=("$bucket"); fi; done < <(attached_buckets)
fi
if [ "${#others[@]}" -gt 0 ]; then
  info "note: ${others[*]} still use another ingest mode; scripts/attach-bucket.sh --ingest $INGEST BUCKET moves one"
fi
