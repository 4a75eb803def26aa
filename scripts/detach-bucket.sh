#!/usr/bin/env bash
# Detaches one bucket from the stack, whatever its ingest mode: removes our part of the
# bucket's notification configuration and every grant for the bucket, nothing else.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"

USAGE="usage: scripts/detach-bucket.sh [--prefix NAME] [--region REGION] BUCKET"

help() {
  cat <<EOF2
$USAGE

Undoes attach-bucket.sh, whatever the ingest mode the bucket was attached with (no
--ingest needed): removes our entry (Id <prefix>ObjectEvents, a Lambda or a queue
entry) from BUCKET's notification configuration and turns the bucket's EventBridge
delivery off if attach-bucket turned it on (not if it was on before), then removes the
grants: the aggregator's permission statement S3Invoke-BUCKET, the bucket in the
ingest queue's policy, the bucket in the event pattern of the rule <prefix>S3Events.
Every other entry of the bucket stays as it is. Running it again, or on a bucket that
was never attached, changes nothing and succeeds.

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

detach_bucket "$BUCKET"
step "Done: $BUCKET no longer sends events to $AGGREGATOR_ARN"
