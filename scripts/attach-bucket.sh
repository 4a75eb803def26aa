#!/usr/bin/env bash
# Attaches one more bucket to an existing stack, with the stack's ingest mode (or the
# one --ingest names): the grant that lets the bucket's events in and our part of the
# bucket's notification configuration, nothing else.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"

USAGE="usage: scripts/attach-bucket.sh [--prefix NAME] [--ingest direct|sqs|eventbridge] [--region REGION] BUCKET"

help() {
  cat <<EOF2
$USAGE

Sends BUCKET's object created, removed and lifecycle expiration events to the stack's
aggregator, the way the stack's ingest mode says (the one create-stack.sh recorded;
--ingest overrides it):

  direct       a Lambda permission S3Invoke-BUCKET (for s3.amazonaws.com, this account
               and this bucket only), and a Lambda entry (Id <prefix>ObjectEvents) in
               the bucket's notification configuration
  sqs          the bucket in the ingest queue's policy (s3.amazonaws.com, this account,
               this bucket), and a queue entry (Id <prefix>ObjectEvents) to
               <prefix>IngestQueue in the bucket's notification configuration
  eventbridge  the bucket in the event pattern of the rule <prefix>S3Events, and the
               bucket's EventBridge delivery turned on

Every other entry of the bucket stays as it is. A bucket attached with another mode
moves to this one: its old entry and grant go. Running it again changes nothing. The
stack must exist (scripts/create-stack.sh) and have the mode's resources: every stack
can use direct; sqs and eventbridge need a create-stack.sh run with that --ingest.

Options:
  --prefix NAME     name prefix of the stack [S3EA_PREFIX] (default $DEFAULT_PREFIX)
  --ingest MODE     direct, sqs or eventbridge [S3EA_INGEST] (default: the stack's mode)
  --region REGION   AWS region [AWS_REGION, AWS_DEFAULT_REGION, then the CLI config]
  -h, --help        this help
EOF2
}

PREFIX_ARG=${S3EA_PREFIX:-$DEFAULT_PREFIX}
INGEST_ARG=${S3EA_INGEST:-}
INGEST_GIVEN=${INGEST_ARG:+yes}
REGION_FLAG=
BUCKET=
need_value() { [ "$1" -ge 2 ] || usage_error "$2 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --prefix) need_value $# "$1"; PREFIX_ARG=$2; shift 2 ;;
    --prefix=*) PREFIX_ARG=${1#*=}; shift ;;
    --ingest) need_value $# "$1"; INGEST_ARG=$2 INGEST_GIVEN=yes; shift 2 ;;
    --ingest=*) INGEST_ARG=${1#*=} INGEST_GIVEN=yes; shift ;;
    --region) need_value $# "$1"; REGION_FLAG=$2; shift 2 ;;
    --region=*) REGION_FLAG=${1#*=}; shift ;;
    -*) usage_error "unknown option $1" ;;
    *)
      [ -z "$BUCKET" ] || usage_error "one BUCKET only"
      BUCKET=$1
      shift
      ;;
  esac
done
[ -n "$BUCKET" ] || usage_error "missing BUCKET"
check_prefix "$PREFIX_ARG"
if [ -n "$INGEST_GIVEN" ]; then INGEST_ARG=$(check_ingest "$INGEST_ARG"); fi
check_bucket "$BUCKET"
set_names "$PREFIX_ARG"
command -v aws >/dev/null 2>&1 || die "the AWS CLI is not installed (pip install awscli)"
resolve_target "$REGION_FLAG"

function_exists "$AGGREGATOR_FUNCTION" ||
  die "function $AGGREGATOR_FUNCTION does not exist: create the stack first (scripts/create-stack.sh --prefix $PREFIX${INGEST_ARG:+ --ingest $INGEST_ARG} $BUCKET)"
load_recorded_ingest
if [ -n "$INGEST_ARG" ]; then
  INGEST=$INGEST_ARG
  step "Ingest: $INGEST (--ingest; the stack was created with ${RECORDED_INGEST:-direct})"
else
  INGEST=${RECORDED_INGEST:-direct}
  step "Ingest: $INGEST (the stack's mode${RECORDED_INGEST:+, recorded on $AGGREGATOR_FUNCTION})"
fi
case $INGEST in
  direct | sqs | eventbridge) ;;
  *) die "the aggregator's tag ${INGEST_TAG:?} has the value '$INGEST': pass --ingest ($INGEST_MODES)" ;;
esac
require_ingest "$INGEST"
attach_bucket "$BUCKET" "$INGEST"
case $INGEST in
  direct) via="" ;;
  sqs) via=" through $INGEST_QUEUE" ;;
  eventbridge) via=" through EventBridge (rule $EVENT_RULE)" ;;
esac
step "Done: $BUCKET sends its object events to $AGGREGATOR_ARN$via"
