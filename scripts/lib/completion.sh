# shellcheck shell=bash
# shellcheck disable=SC2034 # ACTION_QUEUE_POLICY* are read by scripts/create-stack.sh
# The refresh-complete events (SPEC.md, completion events): Storage Gateway puts a
# "Storage Gateway Refresh Cache Event" on the default event bus of the gateway's
# region when a RefreshCache finishes. The rule <prefix>RefreshCompleted sends these
# events to the action queue, where the refresher reads them beside its refresh
# messages (the message body is the EventBridge event). The action queue's policy
# lets EventBridge send them, for that rule only (iam/action-queue-policy.json).
# Sourced by scripts/create-stack.sh and scripts/delete-stack.sh, after
# scripts/lib/stack.sh.
#
# Gateways in the other regions of GATEWAY_REGIONS put their events on their own
# region's bus, which this rule does not see (README.md, Deploy to AWS).

COMPLETION_PATTERN='{"source":["aws.storagegateway"],"detail-type":["Storage Gateway Refresh Cache Event"]}'
COMPLETION_TARGET_ID=ActionQueue
COMPLETION_SID=EventBridgeSendsRefreshCompletions

# load_action_queue_policy: ACTION_QUEUE_POLICY, the action queue's policy to write:
# the current one (when the queue exists) with our statement in place of the
# statement of the same Sid; every other statement stays. ACTION_QUEUE_POLICY_NOTE
# says what changes. Read before ensure_queue sets the queue's attributes.
load_action_queue_policy() {
  local current='' ours others
  ours=$(render_policy "$S3EA_ROOT/iam/action-queue-policy.json" "" | tr -d '[:space:]')
  if aws_maybe 'NonExistentQueue|QueueDoesNotExist' sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text; then
    current=$(aws_cli sqs get-queue-attributes --queue-url "$AWS_OUT" --attribute-names Policy \
      --query Attributes.Policy --output text)
    [ "$current" != None ] || current=
  fi
  # Tabs and line breaks are white space outside JSON strings (and never inside).
  current=$(printf '%s' "$current" | tr '\t\r\n' '   ')
  ACTION_QUEUE_POLICY=$(merge_policy "$current" "$ours") ||
    die "the policy of queue $ACTION_QUEUE has no Statement that this script can read; fix or remove it, then run again"
  others=$(printf '%s' "$ACTION_QUEUE_POLICY" | split_policy | grep -c '^S' || true)
  others=$((others - 1))
  if [ -z "$current" ]; then
    ACTION_QUEUE_POLICY_NOTE="adding: EventBridge may send the events of rule $COMPLETION_RULE (iam/action-queue-policy.json)"
  elif [ "$(printf '%s' "$current" | tr -d '[:space:]')" = "$(printf '%s' "$ACTION_QUEUE_POLICY" | tr -d '[:space:]')" ]; then
    ACTION_QUEUE_POLICY_NOTE="up to date: EventBridge may send the events of rule $COMPLETION_RULE"
  else
    ACTION_QUEUE_POLICY_NOTE="writing statement $COMPLETION_SID: EventBridge may send the events of rule $COMPLETION_RULE (iam/action-queue-policy.json)"
  fi
  if [ "$others" -gt 0 ]; then
    ACTION_QUEUE_POLICY_NOTE="$ACTION_QUEUE_POLICY_NOTE; $others other statement(s) kept"
  fi
}

# action_queue_policy_attribute: ACTION_QUEUE_POLICY as the "Policy" member of a
# set-queue-attributes JSON document (a JSON string).
action_queue_policy_attribute() {
  printf '"Policy":"%s"' "$(printf '%s' "$ACTION_QUEUE_POLICY" | sed 's/[\\"]/\\&/g')"
}

# ensure_completion_rule: the rule on the default event bus, enabled, with the action
# queue as its target. Each part is written only when it differs.
ensure_completion_rule() {
  local pattern state failed targets
  step "EventBridge rule $COMPLETION_RULE -> $ACTION_QUEUE (Storage Gateway Refresh Cache Event, read by $REFRESHER_FUNCTION)"
  if aws_maybe 'ResourceNotFoundException' events describe-rule --name "$COMPLETION_RULE" \
    --query '[State, EventPattern]' --output text; then
    IFS=$'\t' read -r state pattern <<<"$AWS_OUT"
    if [ "$state" = ENABLED ] && [ "$(printf '%s' "$pattern" | tr -d '[:space:]')" = "$(printf '%s' "$COMPLETION_PATTERN" | tr -d '[:space:]')" ]; then
      info "exists, enabled, event pattern up to date"
    else
      info "exists ($state): writing its event pattern $COMPLETION_PATTERN, enabled"
      write_completion_rule
    fi
  else
    info "creating: event pattern $COMPLETION_PATTERN"
    write_completion_rule
  fi
  targets=$(aws_cli events list-targets-by-rule --rule "$COMPLETION_RULE" \
    --query "length(Targets[?Id == '$COMPLETION_TARGET_ID' && Arn == '$ACTION_QUEUE_ARN'])" --output text)
  if [ "$targets" = 1 ]; then
    info "target $COMPLETION_TARGET_ID: $ACTION_QUEUE_ARN, present"
  else
    info "target $COMPLETION_TARGET_ID: $ACTION_QUEUE_ARN, adding"
    failed=$(aws_cli events put-targets --rule "$COMPLETION_RULE" \
      --targets "[{\"Id\":\"$COMPLETION_TARGET_ID\",\"Arn\":\"$ACTION_QUEUE_ARN\"}]" --query FailedEntryCount --output text)
    [ "$failed" = 0 ] || die "EventBridge did not accept the target of rule $COMPLETION_RULE"
  fi
}

write_completion_rule() {
  aws_cli events put-rule --name "$COMPLETION_RULE" --event-pattern "$COMPLETION_PATTERN" --state ENABLED \
    --description "s3-event-aggregator ($PREFIX): Storage Gateway refresh-complete events to $ACTION_QUEUE for $REFRESHER_FUNCTION" >/dev/null
}

# delete_rule NAME: the rule's targets, then the rule (with its tags); fine when absent.
delete_rule() {
  local targets
  step "EventBridge rule $1"
  if ! aws_maybe 'ResourceNotFoundException' events describe-rule --name "$1" --query Arn --output text; then
    info "absent"
    return 0
  fi
  targets=$(aws_cli events list-targets-by-rule --rule "$1" --query 'Targets[].Id' --output text)
  [ "$targets" != None ] || targets=
  if [ -n "$targets" ]; then
    info "removing its targets: $targets"
    # shellcheck disable=SC2086 # one argument per target id
    aws_cli events remove-targets --rule "$1" --ids $targets >/dev/null
  fi
  aws_cli events delete-rule --name "$1"
  info "deleted (with its tags)"
}
