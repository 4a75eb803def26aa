#!/usr/bin/env bash
# The operator's view: for each bucket, its aggregation window and its last refresh
# (time, shares, folders, notification ids), and each of its shares' scheduling
# state (pending folders, refreshes in flight, last call, staleness); then the depth
# of the action queue and of both DLQs, and the command that redrives the action DLQ.
# Read-only.
set -euo pipefail

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. "$(dirname "$0")/lib/stack.sh"

USAGE="usage: scripts/status.sh [--prefix NAME] [--region REGION] [BUCKET...]"

help() {
  cat <<EOF2
$USAGE

Prints, per bucket (every bucket in the table when none is named): whether a window
is open and until when, the last refresh with its time, shares, folders and
notification ids, and per share what waits for its next call (pending folders, since
when), the refreshes in flight, the last call, the next wake-up, and the staleness of
its last completed refresh (from the oldest event it covered to its completion); then
the depth of the action queue and of its DLQ and of the aggregator's DLQ, and the
command that redrives the action DLQ. It only reads.

Options:
  --prefix NAME     name prefix of the stack [S3EA_PREFIX] (default $DEFAULT_PREFIX)
  --region REGION   AWS region [AWS_REGION, AWS_DEFAULT_REGION, then the CLI config]
  -h, --help        this help
EOF2
}

PREFIX_ARG=${S3EA_PREFIX:-$DEFAULT_PREFIX}
REGION_FLAG=
BUCKETS=()
ITEMS=()
need_value() { [ "$1" -ge 2 ] || usage_error "$2 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --prefix) need_value $# "$1"; PREFIX_ARG=$2; shift 2 ;;
    --prefix=*) PREFIX_ARG=${1#*=}; shift ;;
    --region) need_value $# "$1"; REGION_FLAG=$2; shift 2 ;;
    --region=*) REGION_FLAG=${1#*=}; shift ;;
    -*) usage_error "unknown option $1" ;;
    *) check_bucket "$1"; BUCKETS+=("$1"); shift ;;
  esac
done
check_prefix "$PREFIX_ARG"
set_names "$PREFIX_ARG"
command -v aws >/dev/null 2>&1 || die "the AWS CLI is not installed (pip install awscli)"
resolve_target "$REGION_FLAG"

# Epoch milliseconds as UTC time, with GNU date; the raw number elsewhere.
when() {
  local ms=$1
  if [ -z "$ms" ] || [ "$ms" = None ]; then
    printf 'never'
    return
  fi
  date -u -d "@$((ms / 1000))" '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null || printf '%s ms' "$ms"
}
none_as() { if [ "$1" = None ] || [ -z "$1" ]; then printf '%s' "$2"; else printf '%s' "$1"; fi; }

if [ ${#BUCKETS[@]} -eq 0 ]; then
  aws_maybe 'ResourceNotFoundException' dynamodb scan --table-name "$TABLE_NAME" \
    --projection-expression BucketName --query 'Items[].BucketName.S' --output text ||
    die "table $TABLE_NAME not found: is the stack created (prefix $PREFIX)?"
  read -r -a ITEMS <<<"$AWS_OUT"
  # Share items (share#ARN) are listed under their bucket.
  for item in "${ITEMS[@]}"; do
    case $item in None | share#*) ;; *) BUCKETS+=("$item") ;; esac
  done
fi
# Every share item, one line each: bucket, share, pending count, pending since, slots
# in flight, last call, wake-up, last completion, its staleness, pending folders.
aws_maybe 'ResourceNotFoundException' dynamodb scan --table-name "$TABLE_NAME" \
  --filter-expression 'begins_with(BucketName, :p)' --expression-attribute-values '{":p":{"S":"share#"}}' \
  --query "Items[].[Bucket.S, ShareARN.S, length(Pending.SS || \`[]\`), PendingSince.N, length(Slots.L || \`[]\`), LastCallAt.N, WakeAt.N, LastCompletedAt.N, LastStalenessMs.N, join(' ', Pending.SS || \`[]\`)]" \
  --output text || true
SHARE_LINES=${AWS_OUT:-}
[ ${#BUCKETS[@]} -gt 0 ] || info "no bucket has had an event yet"

now_ms=$(($(date +%s) * 1000))
for bucket in "${BUCKETS[@]}"; do
  printf '\nBucket %s\n' "$bucket"
  key="{\"BucketName\":{\"S\":\"$bucket\"}}"
  aws_maybe 'ResourceNotFoundException' dynamodb get-item --table-name "$TABLE_NAME" --consistent-read --key "$key" \
    --query 'Item.[Generation.N, WindowEndsAt.N, SentGeneration.N, ClosedGeneration.N, RefreshedGeneration.N, LastRefreshAt.N, LastEventAt.N]' \
    --output text || die "table $TABLE_NAME not found"
  read -r generation ends sent closed refreshed last_refresh last_event <<<"$AWS_OUT"
  if [ "$(none_as "$generation" 0)" = 0 ]; then
    printf '  window:        none yet (no event recorded for this bucket)\n'
    continue
  fi
  sent=$(none_as "$sent" 0) closed=$(none_as "$closed" 0) refreshed=$(none_as "$refreshed" 0)
  if [ "$closed" -lt "$generation" ] && [ "$(none_as "$ends" 0)" -gt "$now_ms" ]; then
    state="open until $(when "$ends") (window $generation, $((($(none_as "$ends" 0) - now_ms) / 1000)) s left)"
  elif [ "$closed" -lt "$generation" ]; then
    state="ended at $(when "$ends"), waiting for its refresh (window $generation)"
  else
    state="closed (window $generation)"
  fi
  [ "$sent" -ge "$generation" ] || state="$state; its message is NOT known to be sent: the next event or Lambda's retry sends it"
  printf '  window:        %s\n' "$state"
  printf '  last event:    %s\n' "$(when "$last_event")"
  aws_maybe 'ResourceNotFoundException' dynamodb get-item --table-name "$TABLE_NAME" --consistent-read --key "$key" \
    --query 'Item.Folders.SS' --output text || true
  printf '  changed:       %s\n' "$(none_as "${AWS_OUT//$'\t'/ }" '-')"
  # A closed window whose refreshes were not marked when the next one opened.
  aws_maybe 'ResourceNotFoundException' dynamodb get-item --table-name "$TABLE_NAME" --consistent-read --key "$key" \
    --query 'Item.CarriedGeneration.N' --output text || true
  if [ -n "$AWS_OUT" ] && [ "$AWS_OUT" != None ]; then
    printf '  carried:       window %s, not marked refreshed yet; this window refreshes it too\n' "$AWS_OUT"
  fi
  printf '  last refresh:  %s (window %s refreshed)\n' "$(when "$last_refresh")" "$refreshed"
  aws_maybe 'ResourceNotFoundException' dynamodb get-item --table-name "$TABLE_NAME" --consistent-read --key "$key" \
    --query "Item.LastRefresh.M.Refreshes.L[].M.[ShareARN.S, NotificationId.S, join(',', FolderList.L[].S), Recursive.BOOL]" \
    --output text || true
  if [ -z "$AWS_OUT" ] || [ "$AWS_OUT" = None ]; then
    printf '    (no share refreshed)\n'
  else
    while IFS=$'\t' read -r share notification folders recursive; do
      printf '    share %s  folders %s  recursive %s  notification %s\n' "$share" "$folders" "$recursive" "$notification"
    done <<<"$AWS_OUT"
  fi
  printf '  shares:\n'
  found=
  while IFS=$'\t' read -r share_bucket share pending since in_flight last_call wake completed staleness folders; do
    [ "$share_bucket" = "$bucket" ] || continue
    found=yes
    printf '    share %s\n' "$share"
    if [ "$(none_as "$pending" 0)" = 0 ]; then
      printf '      pending:     nothing\n'
    else
      printf '      pending:     %s folder(s) since %s (%s s ago): %s\n' "$pending" "$(when "$since")" \
        "$(((now_ms - $(none_as "$since" "$now_ms")) / 1000))" "$folders"
    fi
    printf '      in flight:   %s of 2\n' "$(none_as "$in_flight" 0)"
    printf '      last call:   %s\n' "$(when "$last_call")"
    if [ "$(none_as "$wake" 0)" -gt "$now_ms" ]; then
      printf '      wake-up:     %s\n' "$(when "$wake")"
    fi
    if [ "$(none_as "$staleness" None)" != None ]; then
      printf '      staleness:   %s ms (last refresh completed %s)\n' "$staleness" "$(when "$completed")"
    else
      printf '      staleness:   no refresh completed yet\n'
    fi
  done <<<"$SHARE_LINES"
  [ -n "$found" ] || printf '    (no share scheduled yet)\n'
done

printf '\nQueues\n'
for queue in "$ACTION_QUEUE" "$ACTION_DLQ" "$AGGREGATOR_DLQ"; do
  if aws_maybe 'NonExistentQueue|does not exist' sqs get-queue-url --queue-name "$queue" --query QueueUrl --output text; then
    url=$AWS_OUT
    aws_cli sqs get-queue-attributes --queue-url "$url" \
      --attribute-names ApproximateNumberOfMessages ApproximateNumberOfMessagesDelayed ApproximateNumberOfMessagesNotVisible \
      --query 'Attributes.[ApproximateNumberOfMessages, ApproximateNumberOfMessagesDelayed, ApproximateNumberOfMessagesNotVisible]' \
      --output text >"$S3EA_TMP/depth"
    read -r visible delayed in_flight <"$S3EA_TMP/depth"
    printf '  %-40s %s visible, %s delayed, %s in flight\n' "$queue" "$(none_as "$visible" 0)" "$(none_as "$delayed" 0)" "$(none_as "$in_flight" 0)"
  else
    printf '  %-40s does not exist\n' "$queue"
  fi
done

cat <<EOF2

Redrive the action DLQ (its messages go back to $ACTION_QUEUE and are refreshed):
  aws sqs start-message-move-task --source-arn $ACTION_DLQ_ARN --region $REGION
Events in $AGGREGATOR_DLQ are Lambda's on-failure records; each holds the S3 event
under requestPayload. Re-invoke the aggregator with it:
  aws lambda invoke --function-name $AGGREGATOR_FUNCTION --invocation-type Event --payload fileb://event.json out.json --region $REGION
EOF2
