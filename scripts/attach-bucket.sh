#!/usr/bin/env bash
# Attaches one more bucket to an existing stack: the aggregator's permission for the
# bucket and our entry in the bucket's notification configuration, nothing else.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"

USAGE="usage: scripts/attach-bucket.sh [--prefix NAME] [--region REGION] BUCKET"

help() {
  cat <<EOF2
$USAGE

Lets BUCKET invoke the stack's aggregator (a lambda add-permission statement
S3Invoke-BUCKET, limited to this account and this bucket) and merges our entry (Id
<prefix>ObjectEvents: object created and removed events to the aggregator) into the
bucket's notification configuration. Every other entry of the bucket stays as it is.
Running it again changes nothing. The stack must exist (scripts/create-stack.sh).

Options:
  --prefix NAME     name prefix of the stack [S3EA_PREFIX] (default $DEFAULT_PREFIX)
  --region REGION   AWS region [AWS_REGION, AWS_DEFAULT_REGION, then the CLI config]
  -h, --help        this help
EOF2
}

PREFIX_ARG=${S3EA_PREFIX:-$DEFAULT_PREFIX}
REGION_FLAG=
BUCKET=
need_value() { [ "$1" -ge 2 ] || usage_error "$2 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --prefix) need_value $# "$1"; PREFIX_ARG=$2; shift 2 ;;
    --prefix=*) PREFIX_ARG=${1#*=}; shift ;;
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
check_bucket "$BUCKET"
set_names "$PREFIX_ARG"
command -v aws >/dev/null 2>&1 || die "the AWS CLI is not installed (pip install awscli)"
resolve_target "$REGION_FLAG"

function_exists "$AGGREGATOR_FUNCTION" ||
  die "function $AGGREGATOR_FUNCTION does not exist: create the stack first (scripts/create-stack.sh${PREFIX_ARG:+ --prefix $PREFIX_ARG} $BUCKET)"
attach_bucket "$BUCKET"
step "Done: $BUCKET sends its object events to $AGGREGATOR_ARN"
