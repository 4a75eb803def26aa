# shellcheck shell=bash
# shellcheck disable=SC2034 # ACTION_QUEUE_POLICY* are read by scripts/create-stack.sh
# The refresh-complete events (docs/spec.md, completion events): Storage Gateway puts a
# "Storage Gateway Refresh Cache Event" on the default event bus of the gateway's
# region when a RefreshCache finishes. The rule <prefix>RefreshCompleted sends these
# events to the action queue, where the refresher reads them beside its refresh
# messages (the message body is the EventBridge event). The action queue's policy
# lets EventBridge send them, for that rule only (iam/action-queue-policy.json).
# Sourced by scripts/create-stack.sh and scripts/delete-stack.sh, after
# scripts/lib/stack.sh.
#
# Gateways in the other regions of GATEWAY_REGIONS put their events on their own
# region's bus, which this rule does not see. So each of those regions gets a rule of
# the same name and pattern whose target is this region's default event bus (a
# cross-region target, with the role <prefix>EventsForwarder, which may only
# events:PutEvents on that bus: iam/events-trust.json, iam/events-forwarder-policy.json).
# A forwarded event keeps its source, detail-type and detail, and the rule here, whose
# pattern names neither account nor region, sends it to the action queue like a local
# one (docs/deployment.md, "Completion events from other regions"). The regions
# that have a forwarding rule are recorded in the role's tag FORWARDING_TAG, so that a
# region that leaves GATEWAY_REGIONS loses its rule even after a failed run, and
# delete-stack.sh finds them all.

COMPLETION_PATTERN='{"source":["aws.storagegateway"],"detail-type":["Storage Gateway Refresh Cache Event"]}'
COMPLETION_TARGET_ID=ActionQueue
COMPLETION_SID=EventBridgeSendsRefreshCompletions
# The forwarding rules' one target (this region's default event bus), and the role's tag.
FORWARDING_TARGET_ID=HomeEventBus
FORWARDING_TAG=s3ea:forwarding-regions

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

# ---------------------------------------------------------------------------------
# Forwarding from the other gateway regions. Region lists are space-separated.

# extra_gateway_regions GATEWAY_REGIONS: its regions other than REGION.
# shellcheck disable=SC2153 # REGION is set by resolve_target (scripts/lib/stack.sh)
extra_gateway_regions() {
  local region out=
  for region in ${1//,/ }; do
    if [ "$region" != "$REGION" ]; then out="$out${out:+ }$region"; fi
  done
  printf '%s' "$out"
}

# region_set REGION...: the regions, sorted, each once, space-separated.
region_set() { printf '%s\n' "$@" | { grep -v '^$' || true; } | sort -u | tr '\n' ' ' | sed 's/ $//'; }

# region_minus "A..." "B...": the regions of A that are not in B.
region_minus() {
  local region out=
  for region in $1; do
    case " $2 " in
      *" $region "*) ;;
      *) out="$out${out:+ }$region" ;;
    esac
  done
  printf '%s' "$out"
}

# load_rule_targets_in REGION: RULE_TARGETS, the targets of the rule COMPLETION_RULE in
# REGION as "Id|Arn" lines; returns 1 when the rule is absent there.
load_rule_targets_in() {
  RULE_TARGETS=
  REGION=$1 aws_maybe 'ResourceNotFoundException' events describe-rule --name "$COMPLETION_RULE" --query Arn --output text ||
    return 1
  REGION=$1 aws_maybe 'ResourceNotFoundException' events list-targets-by-rule --rule "$COMPLETION_RULE" \
    --query 'Targets[].[Id, Arn]' --output text || return 0
  RULE_TARGETS=$(printf '%s\n' "$AWS_OUT" | tr '\t' '|' | grep -v -e '^None$' -e '^$' || true)
}

# foreign_targets: the ARNs of RULE_TARGETS other than this stack's forwarding target,
# space-separated.
foreign_targets() {
  printf '%s\n' "$RULE_TARGETS" | grep -v '^$' | grep -vxF -- "$FORWARDING_TARGET_ID|$HOME_BUS_ARN" |
    cut -d'|' -f2 | tr '\n' ' ' | sed 's/ $//' || true
}

# check_completion_rules EXTRA_REGION...: before anything changes, the rule
# COMPLETION_RULE must be ours wherever this run writes it. Two stacks of one prefix in
# two regions would share its name: in the stack's region, a rule that forwards to an
# event bus is another stack's forwarding rule; in another region, a rule with any
# target but this region's default event bus is another stack's (its completion rule,
# or a forwarding rule to a third region).
check_completion_rules() {
  local region foreign
  if load_rule_targets_in "$REGION"; then
    foreign=$(printf '%s\n' "$RULE_TARGETS" | grep ':event-bus/' | cut -d'|' -f2 | tr '\n' ' ' | sed 's/ $//' || true)
    if [ -n "$foreign" ]; then
      die "the rule $COMPLETION_RULE in $REGION forwards to the event bus $foreign: it is the forwarding rule of a stack with the prefix $PREFIX in another region, and the two would share its name. Nothing was changed: use another --prefix for this stack"
    fi
  fi
  for region in "$@"; do
    if load_rule_targets_in "$region"; then
      foreign=$(foreign_targets)
      if [ -n "$foreign" ]; then
        die "the rule $COMPLETION_RULE in $region has the target(s) $foreign, not the default event bus of $REGION: it is another stack's (prefix $PREFIX), and this stack's forwarding rule there would have its name. Nothing was changed: use another --prefix for this stack, or leave $region out of --gateway-regions"
      fi
    fi
  done
}

# load_recorded_regions: RECORDED_REGIONS, the regions in the forwarder role's tag
# (none when the role or the tag is absent).
load_recorded_regions() {
  RECORDED_REGIONS=
  if aws_maybe 'NoSuchEntity' iam list-role-tags --role-name "$FORWARDER_ROLE" \
    --query "Tags[?Key == '$FORWARDING_TAG'].Value | [0]" --output text && [ "$AWS_OUT" != None ]; then
    # shellcheck disable=SC2086 # one argument per region
    RECORDED_REGIONS=$(region_set $AWS_OUT)
  fi
}

# tag_forwarder_role REGIONS: the role's tag FORWARDING_TAG becomes REGIONS.
tag_forwarder_role() {
  aws_cli iam tag-role --role-name "$FORWARDER_ROLE" --tags "[{\"Key\":\"$FORWARDING_TAG\",\"Value\":\"$1\"}]"
}

# ensure_forwarder_role REGIONS: the role that the forwarding rules use, its trust
# policy and inline policy, and its tag, which records REGIONS (the regions whose rules
# exist, or are about to).
ensure_forwarder_role() {
  local trust policy
  trust=$(render_policy "$S3EA_ROOT/iam/events-trust.json" "")
  policy=$(render_policy "$S3EA_ROOT/iam/events-forwarder-policy.json" "")
  step "IAM role $FORWARDER_ROLE (trusted by events.amazonaws.com; the forwarding rules' role)"
  if aws_maybe 'NoSuchEntity' iam get-role --role-name "$FORWARDER_ROLE" --query Role.AssumeRolePolicyDocument --output json; then
    if same_document "$AWS_OUT" "$trust"; then
      info "exists, trust policy up to date"
    else
      info "exists: updating its trust policy (iam/events-trust.json)"
      aws_cli iam update-assume-role-policy --role-name "$FORWARDER_ROLE" --policy-document "$trust"
    fi
    load_recorded_regions
    if [ "$RECORDED_REGIONS" = "$1" ]; then
      info "tag $FORWARDING_TAG: $1, up to date"
    else
      info "tag $FORWARDING_TAG: $1 (was: ${RECORDED_REGIONS:-none})"
      tag_forwarder_role "$1"
    fi
  else
    info "creating (iam/events-trust.json), tag $FORWARDING_TAG: $1"
    aws_cli iam create-role --role-name "$FORWARDER_ROLE" --assume-role-policy-document "$trust" \
      --description "s3-event-aggregator ($PREFIX): forwards Storage Gateway refresh-complete events to the default event bus of $REGION" \
      --tags "[{\"Key\":\"$FORWARDING_TAG\",\"Value\":\"$1\"}]" >/dev/null
  fi
  if aws_maybe 'NoSuchEntity' iam get-role-policy --role-name "$FORWARDER_ROLE" --policy-name "$FORWARDER_POLICY" \
    --query PolicyDocument --output json && same_document "$AWS_OUT" "$policy"; then
    info "inline policy $FORWARDER_POLICY: up to date (events:PutEvents on $HOME_BUS_ARN only)"
  else
    info "inline policy $FORWARDER_POLICY: writing iam/events-forwarder-policy.json (events:PutEvents on $HOME_BUS_ARN only)"
    aws_cli iam put-role-policy --role-name "$FORWARDER_ROLE" --policy-name "$FORWARDER_POLICY" --policy-document "$policy"
  fi
}

# ensure_forwarding_rule REGION: the rule COMPLETION_RULE in REGION, enabled, with the
# completion pattern, and its one target: this region's default event bus, with the
# forwarder role. Each part is written only when it differs.
ensure_forwarding_rule() {
  local region=$1 state pattern targets failed
  step "EventBridge rule $COMPLETION_RULE in $region -> the default event bus of $REGION (the refresh-complete events of the gateways in $region)"
  if REGION=$region aws_maybe 'ResourceNotFoundException' events describe-rule --name "$COMPLETION_RULE" \
    --query '[State, EventPattern]' --output text; then
    IFS=$'\t' read -r state pattern <<<"$AWS_OUT"
    if [ "$state" = ENABLED ] && [ "$(printf '%s' "$pattern" | tr -d '[:space:]')" = "$(printf '%s' "$COMPLETION_PATTERN" | tr -d '[:space:]')" ]; then
      info "exists, enabled, event pattern up to date"
    else
      info "exists ($state): writing its event pattern $COMPLETION_PATTERN, enabled"
      write_forwarding_rule "$region"
    fi
  else
    info "creating: event pattern $COMPLETION_PATTERN"
    write_forwarding_rule "$region"
  fi
  targets=$(REGION=$region aws_cli events list-targets-by-rule --rule "$COMPLETION_RULE" \
    --query "length(Targets[?Id == '$FORWARDING_TARGET_ID' && Arn == '$HOME_BUS_ARN' && RoleArn == '$FORWARDER_ROLE_ARN'])" --output text)
  if [ "$targets" = 1 ]; then
    info "target $FORWARDING_TARGET_ID: $HOME_BUS_ARN (role $FORWARDER_ROLE), present"
  else
    info "target $FORWARDING_TARGET_ID: $HOME_BUS_ARN (role $FORWARDER_ROLE), adding"
    failed=$(REGION=$region aws_cli events put-targets --rule "$COMPLETION_RULE" \
      --targets "[{\"Id\":\"$FORWARDING_TARGET_ID\",\"Arn\":\"$HOME_BUS_ARN\",\"RoleArn\":\"$FORWARDER_ROLE_ARN\"}]" \
      --query FailedEntryCount --output text)
    [ "$failed" = 0 ] || die "EventBridge did not accept the target of rule $COMPLETION_RULE in $region"
  fi
}

write_forwarding_rule() {
  local home=$REGION
  REGION=$1 aws_cli events put-rule --name "$COMPLETION_RULE" --event-pattern "$COMPLETION_PATTERN" --state ENABLED \
    --description "s3-event-aggregator ($PREFIX): Storage Gateway refresh-complete events to the default event bus of $home, for the rule $COMPLETION_RULE there" >/dev/null
}

# remove_forwarding_rule REGION WHY: deletes the rule COMPLETION_RULE in REGION when it
# is this stack's (no target, or only this region's default event bus); another
# stack's rule of the same name is left as it is.
remove_forwarding_rule() {
  local region=$1 foreign
  step "EventBridge rule $COMPLETION_RULE in $region ($2)"
  if ! load_rule_targets_in "$region"; then
    info "absent"
    return 0
  fi
  foreign=$(foreign_targets)
  if [ -n "$foreign" ]; then
    warn "the rule $COMPLETION_RULE in $region has the target(s) $foreign: it is not this stack's forwarding rule, and stays as it is"
    return 0
  fi
  if [ -n "$RULE_TARGETS" ]; then
    info "removing its target $FORWARDING_TARGET_ID ($HOME_BUS_ARN)"
    REGION=$region aws_cli events remove-targets --rule "$COMPLETION_RULE" --ids "$FORWARDING_TARGET_ID" >/dev/null
  fi
  REGION=$region aws_cli events delete-rule --name "$COMPLETION_RULE"
  info "deleted"
}

# ensure_completion_forwarding GATEWAY_REGIONS PREVIOUS_GATEWAY_REGIONS (comma-separated;
# empty: the refresher's own region only): a forwarding rule in each region of
# GATEWAY_REGIONS other than REGION, with the forwarder role. The rules of the regions
# that left it (those of PREVIOUS_GATEWAY_REGIONS, the function's value before this run,
# and of the role's tag) are deleted, and so is the role when no region is left.
ensure_completion_forwarding() {
  local extras gone region
  extras=$(extra_gateway_regions "$1")
  load_recorded_regions
  # shellcheck disable=SC2046,SC2086 # one argument per region
  gone=$(region_minus "$(region_set $(extra_gateway_regions "$2") $RECORDED_REGIONS)" "$extras")
  if [ -n "$extras" ]; then
    step "Completion events from the other gateway regions: $extras -> the default event bus of $REGION (rule $COMPLETION_RULE there)"
    # shellcheck disable=SC2086 # one argument per region
    ensure_forwarder_role "$(region_set $extras $gone)"
    for region in $extras; do ensure_forwarding_rule "$region"; done
  else
    step "Completion events from the other gateway regions: none (GATEWAY_REGIONS names no region but $REGION)"
  fi
  for region in $gone; do remove_forwarding_rule "$region" "$region is no longer in GATEWAY_REGIONS"; done
  if [ -n "$extras" ]; then
    if [ -n "$gone" ]; then
      # shellcheck disable=SC2086 # one argument per region
      info "role $FORWARDER_ROLE, tag $FORWARDING_TAG: $(region_set $extras)"
      # shellcheck disable=SC2086
      tag_forwarder_role "$(region_set $extras)"
    fi
  elif aws_maybe 'NoSuchEntity' iam get-role --role-name "$FORWARDER_ROLE" --query Role.Arn --output text; then
    delete_role "$FORWARDER_ROLE"
  fi
}

# load_function_gateway_regions: FUNCTION_GATEWAY_REGIONS, the refresher's
# GATEWAY_REGIONS (empty when it or the function is absent).
load_function_gateway_regions() {
  FUNCTION_GATEWAY_REGIONS=
  if aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$REFRESHER_FUNCTION" \
    --query Environment.Variables.GATEWAY_REGIONS --output text && [ "$AWS_OUT" != None ]; then
    FUNCTION_GATEWAY_REGIONS=$AWS_OUT
  fi
}

# delete_completion_forwarding GATEWAY_REGIONS: the forwarding rules of the regions of
# GATEWAY_REGIONS other than REGION and of the forwarder role's tag, then the role.
delete_completion_forwarding() {
  local regions region
  load_recorded_regions
  # shellcheck disable=SC2046,SC2086 # one argument per region
  regions=$(region_set $(extra_gateway_regions "$1") $RECORDED_REGIONS)
  step "Forwarding rules $COMPLETION_RULE in the other gateway regions: ${regions:-none} (from the refresher's GATEWAY_REGIONS${1:+ $1} and the tag $FORWARDING_TAG of $FORWARDER_ROLE)"
  for region in $regions; do remove_forwarding_rule "$region" "forwards to the default event bus of $REGION"; done
  delete_role "$FORWARDER_ROLE"
}
