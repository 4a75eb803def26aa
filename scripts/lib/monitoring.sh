# shellcheck shell=bash
# The stack's CloudWatch alarms and dashboard (docs/operating.md). Sourced by
# scripts/create-stack.sh and scripts/delete-stack.sh, after scripts/lib/stack.sh
# (it uses aws_cli, step, info, warn, die, usage_error and the names of set_names).
#
# The metrics are the functions' EMF lines (shared/src/metrics.rs): namespace
# S3EventAggregator, and two dimension sets. Each invocation writes one line with
# {Function} (the function's totals) and one line per bucket with {Function, Bucket}.
# Function is the Lambda function's own name (AWS_LAMBDA_FUNCTION_NAME: <prefix> for the
# aggregator, <prefix>Refresher for the refresher, AGGREGATOR_FUNCTION and
# REFRESHER_FUNCTION of set_names), so the alarms and the dashboard of two stacks in one
# account and region each watch their own functions. (Outside Lambda the functions
# write "aggregator" and "refresher", which nothing here watches.) A CloudWatch metric
# is one exact dimension set, so:
#   - the alarms use {Function} alone: the totals over every bucket, and metrics that
#     have no bucket (EventsSkippedMalformed, MessagesUnreadable, AccessPointsUnresolved)
#     exist only there;
#   - the dashboard uses {Function, Bucket}, with SEARCH expressions for the buckets
#     that are attached after it was written.

METRICS_NAMESPACE=S3EventAggregator
# The dashboard's period, in seconds.
DASHBOARD_PERIOD=300

# Alarm names are <prefix>-<Name>; <Name> has letters and digits only, so that the
# alarms of a stack whose prefix is "<prefix>-more" are never taken for ours.
alarm_name() { printf '%s-%s' "$PREFIX" "$1"; }

# check_alarm_topic ARN: an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME), or a usage
# error. FIFO topics cannot be alarm actions.
check_alarm_topic() {
  local LC_ALL=C re='^arn:aws(-[a-z]+)*:sns:[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$'
  [[ $1 =~ $re ]] ||
    usage_error "invalid --alarm-topic '$1': an SNS topic ARN, arn:aws:sns:REGION:ACCOUNT:NAME (a standard topic, not FIFO)"
}

# oldest_event_threshold DELAY: the refresher's OldestEventAgeMs alarm threshold in ms.
# A refresh starts about DELAY seconds after its window's first event (the window's
# length) plus the action queue's delivery. Twice the window covers a message that was
# sent back once (MessagesRequeued) or redelivered after a throttle, and 60 s covers
# delivery and the refresher's own batch.
oldest_event_threshold() { printf '%s' $((2 * $1 * 1000 + 60000)); }

# The staleness bound (docs/protocol.md, "The staleness bound"): the RefreshCache that
# covers a change starts within B seconds of the change's event, where
#   B = W + 1 + 60 x H + 5 x (P + 60)
# with W the aggregator's REFRESH_DELAY_SECONDS (the window) and I the refresher's
# MIN_REFRESH_INTERVAL_SECONDS:
#   - W: the window, from its first event to its close, and 1 s of clock margin;
#   - H = ceil(W / 900): the window's message hops (SQS delays at most 900 s), each
#     processed within the 60-s SQS margin;
#   - 5 x (P + 60): the calls of the worst backlog (4 of one kind before it collapses,
#     and one more when whole subtrees and folders wait together), each one interval
#     P = I + 1 s of clock margin (0 when I is 0) and one wake-up's 60-s SQS margin.
# staleness_bound_seconds W I: B, in seconds.
staleness_bound_seconds() {
  local w=$1 i=$2 pacing=0 hops=1
  if [ "$i" -gt 0 ]; then pacing=$((i + 1)); fi
  if [ "$w" -gt 900 ]; then hops=$(((w + 899) / 900)); fi
  printf '%s' $((w + 1 + 60 * hops + 5 * (pacing + 60)))
}

# The listing itself, allowed 10 minutes: StalenessMs is measured at the refresh's
# completion, the bound at its start.
LISTING_ALLOWANCE_SECONDS=600

# staleness_threshold W I: the refresher's StalenessMs alarm threshold in ms, the bound
# plus the listing allowance: 1000 x (B + 600).
staleness_threshold() { printf '%s' $((1000 * ($(staleness_bound_seconds "$1" "$2") + LISTING_ALLOWANCE_SECONDS))); }

# staleness_words W I: how the threshold is made, for the alarm's description.
staleness_words() {
  local w=$1 i=$2 words hops=1
  if [ "$w" -gt 900 ]; then hops=$(((w + 899) / 900)); fi
  words="$w s of window (REFRESH_DELAY_SECONDS) + 1 s of clock margin + $hops x 60 s of SQS delivery for the window's message"
  if [ "$i" -gt 0 ]; then
    words="$words + 5 x ($i + 1 + 60) s for a backlog of 5 calls, one per MIN_REFRESH_INTERVAL_SECONDS=$i plus a 1-s clock margin, each brought by a wake-up"
  else
    words="$words + 5 x 60 s for a backlog of 5 calls, each brought by a wake-up (MIN_REFRESH_INTERVAL_SECONDS=0)"
  fi
  printf '%s = %s s (the staleness bound of docs/protocol.md), plus %s s for the listing itself' \
    "$words" "$(staleness_bound_seconds "$w" "$i")" "$LISTING_ALLOWANCE_SECONDS"
}

# The alarms, one per line: NAME|NAMESPACE|METRIC|DIMENSION=VALUE|STATISTIC|PERIOD|
# EVALUATION_PERIODS|THRESHOLD|DESCRIPTION. Every alarm is "STATISTIC > THRESHOLD in
# each of EVALUATION_PERIODS periods of PERIOD seconds", and missing data is not
# breaching (no invocation, no line). Needs set_names; DELAY is the aggregator's
# REFRESH_DELAY_SECONDS, INTERVAL the refresher's MIN_REFRESH_INTERVAL_SECONDS;
# WITH_INGEST_DLQ is true when the stack has the ingest DLQ. The Function dimension is
# the function's name.
alarm_specs() { # DELAY INTERVAL WITH_INGEST_DLQ
  local a=$AGGREGATOR_FUNCTION r=$REFRESHER_FUNCTION ns=$METRICS_NAMESPACE
  local see="See docs/operating.md."
  cat <<EOF
AggregatorDlqNotEmpty|AWS/SQS|ApproximateNumberOfMessagesVisible|QueueName=$AGGREGATOR_DLQ|Maximum|300|1|0|$AGGREGATOR_DLQ holds S3 events that the aggregator could not process after its retries: their changes are not refreshed. $see
ActionDlqNotEmpty|AWS/SQS|ApproximateNumberOfMessagesVisible|QueueName=$ACTION_DLQ|Maximum|300|1|0|$ACTION_DLQ holds refresh requests that failed 10 times: their changes are not refreshed. Fix the cause, then redrive it. $see
EOF
  if [ "$3" = true ]; then
    cat <<EOF
IngestDlqNotEmpty|AWS/SQS|ApproximateNumberOfMessagesVisible|QueueName=$INGEST_DLQ|Maximum|300|1|0|$INGEST_DLQ holds ingest messages that failed 5 times: their changes are not refreshed. $see
EOF
  fi
  cat <<EOF
RefreshesThrottled|$ns|RefreshesThrottled|Function=$r|Sum|900|1|10|More than 10 refreshes in 15 minutes were refused by the gateway although the refresher paced them: something else calls RefreshCache on the shares, completion events do not arrive (the RefreshCompleted rule), or the gateway is busy or offline. $see
MessagesFailed|$ns|MessagesFailed|Function=$r|Sum|300|3|0|Refresh messages failed in 3 periods of 5 minutes in a row (throttling, 5xx, an unreachable gateway): SQS redelivers them, then moves them to $ACTION_DLQ. $see
OldestEventTooOld|$ns|OldestEventAgeMs|Function=$r|Maximum|300|1|$(oldest_event_threshold "$1")|A refresh started more than 2 x REFRESH_DELAY_SECONDS ($1 s) + 60 s after its window's first event: shares are staler than the window promises. $see
StalenessTooHigh|$ns|StalenessMs|Function=$r|Maximum|300|1|$(staleness_threshold "$1" "$2")|A refresh completed more than $(($(staleness_threshold "$1" "$2") / 1000)) s after the oldest event it covers. The threshold is the staleness bound plus the listing: $(staleness_words "$1" "$2"). A share showed changes late. $see
S3DeliveryLate|$ns|OldestEventAgeMs|Function=$a|Maximum|300|1|300000|An S3 event reached the aggregator more than 5 minutes after its eventTime (S3's delivery lag, or a backlog in Lambda's asynchronous queue or the ingest queue). $see
EventsSkippedMalformed|$ns|EventsSkippedMalformed|Function=$a|Sum|3600|1|0|Records with no bucket or key reached the aggregator in the last hour: something other than S3 invokes it. $see
AccessPointsUnresolved|$ns|AccessPointsUnresolved|Function=$r|Sum|3600|1|0|A file share on an S3 access point could not be mapped to its bucket in the last hour: that share is not refreshed. $see
MessagesUnreadable|$ns|MessagesUnreadable|Function=$r|Sum|300|1|0|The refresher dropped refresh messages that name no bucket (logged in full). $see
EOF
}

# The names of our alarms that exist, one per line.
existing_alarms() {
  local name names
  names=$(aws_cli cloudwatch describe-alarms --alarm-name-prefix "$PREFIX-" --alarm-types MetricAlarm \
    --query 'MetricAlarms[].AlarmName' --output text)
  [ "$names" != None ] || names=
  for name in $names; do
    case ${name#"$PREFIX-"} in
      *[!A-Za-z0-9]* | "") ;;
      *) printf '%s\n' "$name" ;;
    esac
  done
}

# ensure_alarms TOPIC DELAY INTERVAL WITH_INGEST_DLQ: puts every alarm (put-metric-alarm
# creates or overwrites), each notifying TOPIC when it goes to ALARM and back to OK.
# With no TOPIC it changes nothing: existing alarms stay as they are, and a threshold
# that DELAY or INTERVAL changed is pointed out.
ensure_alarms() {
  local topic=$1 delay=${2:-30} interval=${3:-60} with_ingest=$4 existing name ns metric dimension stat period evaluations threshold description current
  existing=$(existing_alarms)
  if [ -z "$topic" ]; then
    if [ -z "$existing" ]; then
      step "CloudWatch alarms: none (pass --alarm-topic ARN to create them)"
      return
    fi
    step "CloudWatch alarms: $(printf '%s\n' "$existing" | wc -l | tr -d ' ') kept as they are (no --alarm-topic)"
    current=$(aws_cli cloudwatch describe-alarms --alarm-names "$(alarm_name OldestEventTooOld)" \
      --query 'MetricAlarms[0].Threshold' --output text)
    if [ "$current" != None ] && [ "${current%.0}" != "$(oldest_event_threshold "$delay")" ]; then
      warn "alarm $(alarm_name OldestEventTooOld) has the threshold $current ms, not $(oldest_event_threshold "$delay") ms for REFRESH_DELAY_SECONDS=$delay: run again with --alarm-topic ARN to update the alarms"
    fi
    current=$(aws_cli cloudwatch describe-alarms --alarm-names "$(alarm_name StalenessTooHigh)" \
      --query 'MetricAlarms[0].Threshold' --output text)
    if [ "$current" != None ] && [ "${current%.0}" != "$(staleness_threshold "$delay" "$interval")" ]; then
      warn "alarm $(alarm_name StalenessTooHigh) has the threshold $current ms, not $(staleness_threshold "$delay" "$interval") ms for REFRESH_DELAY_SECONDS=$delay and MIN_REFRESH_INTERVAL_SECONDS=$interval: run again with --alarm-topic ARN to update the alarms"
    fi
    if [ "$with_ingest" = true ] && ! printf '%s\n' "$existing" | grep -qx "$(alarm_name IngestDlqNotEmpty)"; then
      warn "no alarm watches $INGEST_DLQ: run again with --alarm-topic ARN to add $(alarm_name IngestDlqNotEmpty)"
    fi
    return
  fi
  step "CloudWatch alarms $PREFIX-*: notifying $topic (ALARM and OK)"
  info "staleness bound: $(staleness_bound_seconds "$delay" "$interval") s for REFRESH_DELAY_SECONDS=$delay and MIN_REFRESH_INTERVAL_SECONDS=$interval (docs/protocol.md, \"The staleness bound\")"
  while IFS='|' read -r name ns metric dimension stat period evaluations threshold description; do
    name=$(alarm_name "$name")
    info "$name: $metric ($ns, ${dimension%%=*}=${dimension#*=}) $stat > $threshold, $evaluations x ${period}s"
    aws_cli cloudwatch put-metric-alarm --alarm-name "$name" --alarm-description "$description" \
      --namespace "$ns" --metric-name "$metric" --dimensions "Name=${dimension%%=*},Value=${dimension#*=}" \
      --statistic "$stat" --period "$period" --evaluation-periods "$evaluations" \
      --datapoints-to-alarm "$evaluations" --threshold "$threshold" \
      --comparison-operator GreaterThanThreshold --treat-missing-data notBreaching \
      --alarm-actions "$topic" --ok-actions "$topic"
  done < <(alarm_specs "$delay" "$interval" "$with_ingest")
}

# check_topic_exists ARN: when the topic is in the stack's account and region, it must
# exist (checked before anything changes). Without the permission to look, or for a topic elsewhere, a warning only.
check_topic_exists() {
  local rest=${1#*:sns:} topic_region topic_account
  topic_region=${rest%%:*} rest=${rest#*:} topic_account=${rest%%:*}
  if [ "$topic_region" != "$REGION" ] || [ "$topic_account" != "$ACCOUNT_ID" ]; then
    info "the topic is in account $topic_account, region $topic_region: not checked (its policy must let cloudwatch.amazonaws.com publish)"
    return
  fi
  if aws_cli sns get-topic-attributes --topic-arn "$1" >/dev/null 2>"$S3EA_TMP/sns-err"; then
    info "exists"
    return
  fi
  if grep -Eq 'NotFound' "$S3EA_TMP/sns-err"; then
    die "SNS topic $1 does not exist: create it (aws sns create-topic --name ${1##*:}) or pass another --alarm-topic"
  fi
  warn "cannot check SNS topic $1 ($(tr '\n' ' ' <"$S3EA_TMP/sns-err")); putting the alarms anyway"
}

# delete_alarms: deletes our alarms (<prefix>-<Name>); nothing to do when none exists.
delete_alarms() {
  local existing
  step "CloudWatch alarms $PREFIX-*"
  existing=$(existing_alarms)
  if [ -z "$existing" ]; then
    info "no alarm named $PREFIX-<Name>"
    return
  fi
  # shellcheck disable=SC2086 # one argument per alarm name (letters, digits, - and _)
  info "deleting" $existing
  # delete-alarms takes up to 100 names; there are at most 10.
  # shellcheck disable=SC2086
  aws_cli cloudwatch delete-alarms --alarm-names $existing
}

# ---------------------------------------------------------------------------------
# The dashboard <prefix>. Its body is the heredoc in dashboard_body, with one helper
# per kind of widget. Every name in it (prefix, queues, buckets, region) is made of
# letters, digits, '.', '-' and '_', so nothing needs escaping in JSON.

# A metric from the EMF lines, per bucket: ["S3EventAggregator", METRIC, "Function",
# FUNCTION, "Bucket", BUCKET, {OPTIONS}].
bucket_metric() { # FUNCTION METRIC BUCKET OPTIONS_JSON
  printf '["%s","%s","Function","%s","Bucket","%s",%s]' "$METRICS_NAMESPACE" "$2" "$1" "$3" "$4"
}

# A SEARCH over the Bucket dimension: one line per bucket that has the metric, also the
# buckets attached after the dashboard was written. LABEL (default: the metric's name)
# comes before the bucket's name.
bucket_search() { # ID FUNCTION METRIC STATISTIC [LABEL]
  local expression label
  expression="SEARCH('{$METRICS_NAMESPACE,Function,Bucket} MetricName=\\\"$3\\\" Function=\\\"$2\\\"', '$4', $DASHBOARD_PERIOD)"
  label="${5:-$3} \${PROP('Dim.Bucket')}" # CloudWatch's dynamic label: the bucket's name
  printf '[{"id":"%s","expression":"%s","label":"%s"}]' "$1" "$expression" "$label"
}

# The depth of one DLQ.
dlq_metric() { # QUEUE LABEL
  printf '["AWS/SQS","ApproximateNumberOfMessagesVisible","QueueName","%s",{"label":"%s"}]' "$1" "$2"
}

# A metric widget: a time series of METRICS (comma-separated metric arrays). EXTRA
# (members of the properties object, such as annotations) is added.
metric_widget() { # X Y WIDTH TITLE STATISTIC METRICS [EXTRA]
  printf '{"type":"metric","x":%s,"y":%s,"width":%s,"height":6,"properties":{"title":"%s","region":"%s","view":"timeSeries","stacked":false,"stat":"%s","period":%s,"metrics":[%s]%s}}' \
    "$1" "$2" "$3" "$4" "$REGION" "$5" "$DASHBOARD_PERIOD" "$6" "${7:+,$7}"
}

# The staleness row: every bucket's StalenessMs (Maximum and p95, per completed
# refresh) and the refresher's OldestEventAgeMs (Maximum, at the call), with a line at
# the staleness bound B and one at the StalenessTooHigh alarm's threshold.
staleness_widget() { # Y DELAY INTERVAL
  local r=$REFRESHER_FUNCTION bound threshold
  bound=$((1000 * $(staleness_bound_seconds "$2" "$3")))
  threshold=$(staleness_threshold "$2" "$3")
  metric_widget 0 "$1" 24 "Staleness, per bucket (ms): at completion (max, p95) and at the call (oldest event age)" Maximum \
    "$(bucket_search s1 "$r" StalenessMs Maximum "StalenessMs max"),$(bucket_search s2 "$r" StalenessMs p95 "StalenessMs p95"),$(bucket_search o1 "$r" OldestEventAgeMs Maximum "OldestEventAgeMs max")" \
    "\"yAxis\":{\"left\":{\"min\":0}},\"annotations\":{\"horizontal\":[{\"label\":\"staleness bound B ($((bound / 1000)) s)\",\"value\":$bound},{\"label\":\"StalenessTooHigh alarm (B + ${LISTING_ALLOWANCE_SECONDS} s of listing)\",\"value\":$threshold}]}"
}

# One row per bucket: what came in and what was written; the refreshes and how old the
# oldest event was when its refresh started; the failures.
bucket_row() { # Y BUCKET
  local y=$1 b=$2 a=$AGGREGATOR_FUNCTION r=$REFRESHER_FUNCTION
  metric_widget 0 "$y" 8 "$b: events in, windows opened, window writes" Sum \
    "$(bucket_metric "$a" EventsReceived "$b" '{"label":"events in"}'),$(bucket_metric "$a" WindowsOpened "$b" '{"label":"windows opened"}'),$(bucket_metric "$a" WindowWrites "$b" '{"label":"window writes"}')"
  printf ',\n'
  metric_widget 8 "$y" 8 "$b: refreshes requested, oldest event age" Sum \
    "$(bucket_metric "$r" RefreshesRequested "$b" '{"label":"refreshes requested"}'),$(bucket_metric "$r" OldestEventAgeMs "$b" '{"label":"oldest event age (ms, max)","stat":"Maximum","yAxis":"right"}')"
  printf ',\n'
  metric_widget 16 "$y" 8 "$b: failures" Sum \
    "$(bucket_metric "$r" MessagesFailed "$b" '{"label":"messages failed"}'),$(bucket_metric "$r" RefreshesThrottled "$b" '{"label":"refreshes throttled"}')"
}

# dashboard_body WITH_INGEST_DLQ DELAY INTERVAL BUCKET...: the dashboard's JSON.
dashboard_body() {
  local with_ingest=$1 delay=$2 interval=$3 a=$AGGREGATOR_FUNCTION r=$REFRESHER_FUNCTION y=20 bucket dlqs
  shift 3
  dlqs="$(dlq_metric "$AGGREGATOR_DLQ" "aggregator DLQ"),$(dlq_metric "$ACTION_DLQ" "action DLQ")"
  if [ "$with_ingest" = true ]; then dlqs="$dlqs,$(dlq_metric "$INGEST_DLQ" "ingest DLQ")"; fi
  cat <<EOF
{"widgets": [
$(printf '{"type":"text","x":0,"y":0,"width":24,"height":2,"properties":{"markdown":"## s3-event-aggregator %s (%s)\\nThe first three rows show every bucket (SEARCH over the Bucket dimension, so buckets attached later appear too); the third is staleness, with lines at the staleness bound and at the StalenessTooHigh alarm; then one row per bucket attached when create-stack.sh last ran (%s). Events in should be followed by windows opened and refreshes requested; failures and DLQ depths should stay at 0. See docs/operating.md."}}' "$PREFIX" "$REGION" "${*:-none}"),
$(metric_widget 0 2 8 "Events in, per bucket" Sum "$(bucket_search e1 "$a" EventsReceived Sum)"),
$(metric_widget 8 2 8 "Windows opened, per bucket" Sum "$(bucket_search w1 "$a" WindowsOpened Sum)"),
$(metric_widget 16 2 8 "Window writes (DynamoDB), per bucket" Sum "$(bucket_search d1 "$a" WindowWrites Sum)"),
$(metric_widget 0 8 8 "Refreshes requested, per bucket" Sum "$(bucket_search r1 "$r" RefreshesRequested Sum)"),
$(metric_widget 8 8 8 "Failures: messages failed, refreshes throttled, per bucket" Sum "$(bucket_search f1 "$r" MessagesFailed Sum),$(bucket_search t1 "$r" RefreshesThrottled Sum)"),
$(metric_widget 16 8 8 "DLQ depths (messages visible)" Maximum "$dlqs"),
$(staleness_widget 14 "$delay" "$interval")$(for bucket in "$@"; do
    printf ',\n'
    bucket_row "$y" "$bucket"
    y=$((y + 6))
  done)
]}
EOF
}

# ensure_dashboard WITH_INGEST_DLQ DELAY INTERVAL BUCKET...: puts the dashboard <prefix>
# (put-dashboard creates or overwrites). DELAY and INTERVAL place the staleness lines.
ensure_dashboard() {
  local with_ingest=$1 delay=${2:-30} interval=${3:-60} messages
  shift 3
  step "CloudWatch dashboard $PREFIX: every bucket, staleness (bound $(staleness_bound_seconds "$delay" "$interval") s, alarm at $(staleness_threshold "$delay" "$interval") ms), and one row per bucket (${*:-none attached})"
  dashboard_body "$with_ingest" "$delay" "$interval" "$@" >"$S3EA_TMP/dashboard.json"
  messages=$(aws_cli cloudwatch put-dashboard --dashboard-name "$PREFIX" \
    --dashboard-body "file://$S3EA_TMP/dashboard.json" --query 'DashboardValidationMessages[].Message' --output text)
  if [ -n "$messages" ] && [ "$messages" != None ]; then warn "dashboard $PREFIX: $messages"; fi
  info "https://$REGION.console.aws.amazon.com/cloudwatch/home?region=$REGION#dashboards/dashboard/$PREFIX"
}

# delete_dashboard: deletes the dashboard <prefix>; nothing to do when it is absent.
delete_dashboard() {
  local found
  step "CloudWatch dashboard $PREFIX"
  found=$(aws_cli cloudwatch list-dashboards --dashboard-name-prefix "$PREFIX" \
    --query "length(DashboardEntries[?DashboardName == '$PREFIX'])" --output text)
  if [ "$found" = 0 ]; then
    info "dashboard $PREFIX: absent"
    return
  fi
  aws_cli cloudwatch delete-dashboards --dashboard-names "$PREFIX"
  info "dashboard $PREFIX: deleted"
}
