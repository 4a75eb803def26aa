#!/usr/bin/env bash
# The deployment test: runs scripts/create-stack.sh, attach-bucket.sh, detach-bucket.sh
# and delete-stack.sh with the real AWS CLI against a moto server, and checks every
# resource they make, through the AWS APIs: first a stack with the default ingest mode
# (direct), with gateways in other regions (the forwarding rules there), short refresh
# intervals and the CloudWatch alarms and dashboard, then one with --ingest sqs and one
# with --ingest eventbridge, then the takeover of a deployment of the 2018 scripts
# (tests/deploy/fixture-2018.sh makes one).
#
# It starts its own moto server on a free loopback port, or uses MOTO_ENDPOINT when it
# is set (then the names get a unique prefix, so that other users of that server are
# not disturbed). The first run builds the functions for arm64 in release mode (about
# 10 minutes on 2 cores); later runs reuse the build. With S3EA_SKIP_BUILD=1, the
# scripts deploy the zip files already in target/lambda/ and build nothing (moto
# stores the code and never runs it). The last line is "N passed, M failed".
#
# Test code may use python3 (moto needs it anyway); the scripts under test may not.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# ---------------------------------------------------------------------------------
# Assertions

PASSED=0
FAILED=0
summary() { echo "$PASSED passed, $FAILED failed"; }
phase() { printf '==> %s  [%ss]\n' "$1" "$SECONDS"; }
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s\n' "$1" >&2
  if [ $# -gt 1 ]; then printf '      %s\n' "${@:2}" >&2; fi
  summary
  exit 1
}
pass() {
  PASSED=$((PASSED + 1))
  printf 'ok    %s\n' "$1"
}
# check_eq WHAT EXPECTED ACTUAL
check_eq() {
  if [ "$2" = "$3" ]; then pass "$1: $3"; else fail "$1" "expected: $2" "actual:   $3"; fi
}
# check_ge WHAT MIN ACTUAL
check_ge() {
  if [ "$3" -ge "$2" ]; then pass "$1: $3 >= $2"; else fail "$1" "expected at least $2, got $3"; fi
}
# check_run WHAT EXPECTED_STATUS CMD...: runs CMD with its output in a log file.
check_run() {
  local what=$1 expected=$2 status=0 log
  shift 2
  log="$WORK/run-$((PASSED + FAILED)).log"
  "$@" >"$log" 2>&1 || status=$?
  if [ "$status" = "$expected" ]; then
    pass "$what: exit $status"
  else
    echo "---- output of: $*" >&2
    tail -n 40 "$log" >&2
    fail "$what" "expected exit $expected, got $status (full output: $log)"
  fi
  LAST_LOG=$log
}
# check_log_has WHAT PATTERN: the last check_run output contains PATTERN (grep -E).
check_log_has() {
  if grep -Eq -- "$2" "$LAST_LOG"; then pass "$1"; else fail "$1" "no line matches /$2/ in $LAST_LOG"; fi
}

# ---------------------------------------------------------------------------------
# moto and the AWS CLI environment

WORK=$(mktemp -d "${TMPDIR:-/tmp}/deploy-test.XXXXXX")
MOTO_PID=
FINISHED=false
cleanup() {
  if [ -n "$MOTO_PID" ]; then kill "$MOTO_PID" 2>/dev/null || true; fi
  if $FINISHED && [ "$FAILED" = 0 ]; then rm -rf "$WORK"; else echo "logs kept in $WORK" >&2; fi
}
trap cleanup EXIT

# Only the variables set here reach the AWS CLI and the scripts: no profile, no
# configuration file, no real credentials.
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_SECURITY_TOKEN AWS_REGION \
  S3EA_PREFIX S3EA_ARCH S3EA_BUCKETS S3EA_BILLING_MODE S3EA_DEPLOY_TOOL S3EA_INGEST S3EA_ALARM_TOPIC AWS_ACCOUNT_ID \
  REFRESH_DELAY_SECONDS LOG_LEVEL GATEWAY_REGIONS MIN_REFRESH_INTERVAL_SECONDS ALLOW_SHORT_REFRESH_INTERVAL
export AWS_CONFIG_FILE="$WORK/aws-config" AWS_SHARED_CREDENTIALS_FILE="$WORK/aws-credentials"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=eu-west-1
REGION=$AWS_DEFAULT_REGION

for tool in aws moto_server python3 cargo; do
  command -v "$tool" >/dev/null 2>&1 || fail "tool $tool is on PATH" "install it: scripts/install-deps.sh --all"
done

if [ -n "${MOTO_ENDPOINT:-}" ]; then
  echo "==> Using the moto server at $MOTO_ENDPOINT"
  SUFFIX=$(date +%s)$$
  PREFIX_OPT=(--prefix "S3EATest$SUFFIX")
  PREFIX="S3EATest$SUFFIX"
  BUCKET_SUFFIX="-$SUFFIX"
else
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
  echo "==> Starting moto server on 127.0.0.1:$port (log: $WORK/moto.log)"
  # Phases 5c and 12 read requests back through moto's recorder, which writes this
  # file. The 2018 fixture (phase 12) attaches the AWS managed policy
  # AWSLambdaBasicExecutionRole, which moto knows only when it loads them.
  MOTO_RECORDER_FILEPATH="$WORK/moto-recording" MOTO_IAM_LOAD_MANAGED_POLICIES=true \
    moto_server -H 127.0.0.1 -p "$port" >"$WORK/moto.log" 2>&1 &
  MOTO_PID=$!
  MOTO_ENDPOINT="http://127.0.0.1:$port"
  tries=0
  until python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/moto-api/', timeout=1)" "$MOTO_ENDPOINT" 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ] || ! kill -0 "$MOTO_PID" 2>/dev/null; then
      cat "$WORK/moto.log" >&2
      fail "moto server starts"
    fi
    sleep 0.5
  done
  # The default prefix: the names of the contract.
  PREFIX_OPT=()
  PREFIX=S3EventAggregator
  BUCKET_SUFFIX=
fi
DEFAULT_PREFIX_NAME=S3EventAggregator
export AWS_ENDPOINT_URL=$MOTO_ENDPOINT

awsm() { aws --endpoint-url "$AWS_ENDPOINT_URL" --region "$REGION" "$@"; }
awsr() { # REGION ARGS...: in another region
  local region=$1
  shift
  aws --endpoint-url "$AWS_ENDPOINT_URL" --region "$region" "$@"
}
# Gateway regions besides the stack's: moto keeps one EventBridge backend per region.
OTHER_REGION=us-west-2
THIRD_REGION=ap-south-1
ACCOUNT=$(awsm sts get-caller-identity --query Account --output text)

# The names that the scripts must use (docs/deployment.md, Create), for one prefix.
SQS_ARN=arn:aws:sqs:$REGION:$ACCOUNT
use_prefix() { # PREFIX
  PREFIX=$1
  TABLE=$PREFIX
  ACTION_QUEUE=${PREFIX}ActionQueue
  ACTION_DLQ=${PREFIX}ActionDLQ
  AGGREGATOR_DLQ=${PREFIX}AggregatorDLQ
  AGGREGATOR=$PREFIX
  REFRESHER=${PREFIX}Refresher
  AGGREGATOR_ROLE=${PREFIX}AggregatorRole
  REFRESHER_ROLE=${PREFIX}RefresherRole
  AGGREGATOR_POLICY=${PREFIX}AggregatorPolicy
  REFRESHER_POLICY=${PREFIX}RefresherPolicy
  NOTIFICATION_ID=${PREFIX}ObjectEvents
  AGGREGATOR_ARN=arn:aws:lambda:$REGION:$ACCOUNT:function:$AGGREGATOR
  # --ingest sqs and --ingest eventbridge
  INGEST_QUEUE=${PREFIX}IngestQueue
  INGEST_DLQ=${PREFIX}IngestDLQ
  INGEST_POLICY=${PREFIX}AggregatorIngestPolicy
  EVENT_RULE=${PREFIX}S3Events
  EVENT_RULE_ARN=arn:aws:events:$REGION:$ACCOUNT:rule/$EVENT_RULE
  # Every stack: the refresh-complete events to the action queue.
  COMPLETION_RULE=${PREFIX}RefreshCompleted
  COMPLETION_RULE_ARN=arn:aws:events:$REGION:$ACCOUNT:rule/$COMPLETION_RULE
  # Gateways in other regions: the forwarding rules' role and its inline policy.
  FORWARDER_ROLE=${PREFIX}EventsForwarder
  FORWARDER_POLICY=${PREFIX}EventsForwarderPolicy
  HOME_BUS_ARN=arn:aws:events:$REGION:$ACCOUNT:event-bus/default
}
use_prefix "$PREFIX"
ONE=s3ea-test-one$BUCKET_SUFFIX
TWO=s3ea-test-two$BUCKET_SUFFIX
THREE=s3ea-test-three$BUCKET_SUFFIX
if [ "${#PREFIX_OPT[@]}" -eq 0 ]; then
  check_eq "default names: table and action queue of the contract" \
    "S3EventAggregator S3EventAggregatorActionQueue" "$TABLE $ACTION_QUEUE"
fi

# ---------------------------------------------------------------------------------
# Readers

# The aggregator's resource policy, as "Sid|Principal|Action|SourceArn|SourceAccount"
# lines, sorted.
permissions() {
  local policy
  policy=$(awsm lambda get-policy --function-name "$AGGREGATOR" --query Policy --output text 2>/dev/null) || return 0
  printf '%s' "$policy" | python3 -c '
import json, sys
for s in json.load(sys.stdin)["Statement"]:
    c = s.get("Condition", {})
    print("|".join([s.get("Sid", ""), json.dumps(s.get("Principal"), sort_keys=True), s.get("Action", ""),
        c.get("ArnLike", {}).get("AWS:SourceArn", ""), c.get("StringEquals", {}).get("AWS:SourceAccount", "")]))
' | sort
}
permission_line() {
  printf 'S3Invoke-%s|{"Service": "s3.amazonaws.com"}|lambda:InvokeFunction|arn:aws:s3:::%s|%s' "$1" "$1" "$ACCOUNT"
}
count_lines() { if [ -z "$1" ]; then echo 0; else printf '%s\n' "$1" | wc -l | tr -d ' '; fi; }
# Our entries in a bucket's notification configuration, Lambda entries then queue
# entries, as "Id|FunctionArn or QueueArn|Events" (the event types sorted).
our_entries() {
  # shellcheck disable=SC2016 # JMESPath literals
  awsm s3api get-bucket-notification-configuration --bucket "$1" --output text \
    --query "[LambdaFunctionConfigurations[?Id == '$NOTIFICATION_ID'].[Id, LambdaFunctionArn, join(',', sort(Events))] || \`[]\`, QueueConfigurations[?Id == '$NOTIFICATION_ID'].[Id, QueueArn, join(',', sort(Events))] || \`[]\`][]" |
    tr '\t' '|' | grep -v '^None$' || true
}
# The event types of our entries, as our_entries prints them: every change of a
# listing, lifecycle expirations included; and those of an entry that a deployment
# from before s3:LifecycleExpiration:* wrote.
OUR_EVENTS="s3:LifecycleExpiration:*,s3:ObjectCreated:*,s3:ObjectRemoved:*"
OLD_EVENTS="s3:ObjectCreated:*,s3:ObjectRemoved:*"
# put_old_entry BUCKET: our entry becomes what an older deployment wrote (only the two
# old event types); every other entry of the bucket is put back as it is.
put_old_entry() {
  local config
  config=$(awsm s3api get-bucket-notification-configuration --bucket "$1" --output json | python3 -c '
import json, sys
config, ours = json.load(sys.stdin), 0
for kind in ("LambdaFunctionConfigurations", "QueueConfigurations"):
    for entry in config.get(kind, []):
        if entry["Id"] == sys.argv[1]:
            entry["Events"] = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
            ours += 1
assert ours == 1, "entries of ours: %d" % ours
print(json.dumps(config))
' "$NOTIFICATION_ID")
  awsm s3api put-bucket-notification-configuration --bucket "$1" --notification-configuration "$config"
}
# ere TEXT: TEXT as an extended regular expression that matches it literally.
ere() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }
# update_line: the line (a pattern for grep -E) with which attach_bucket says that it
# updates an old entry, for the current prefix.
update_line() {
  printf "notification %s: updating our entry's events from %s to %s" \
    "$NOTIFICATION_ID" "$(ere "$OLD_EVENTS")" "$(ere "$OUR_EVENTS")"
}
# Everything in a bucket's notification configuration except our entry, as compact JSON.
foreign_entries() {
  awsm s3api get-bucket-notification-configuration --bucket "$1" --output json \
    --query "{Queue: QueueConfigurations[?Id != '$NOTIFICATION_ID'], Topic: TopicConfigurations, Lambda: LambdaFunctionConfigurations[?Id != '$NOTIFICATION_ID']}" |
    tr -d '[:space:]' # no value here has a space
}
queue_attribute() { # QUEUE ATTRIBUTE
  local url
  url=$(awsm sqs get-queue-url --queue-name "$1" --query QueueUrl --output text)
  awsm sqs get-queue-attributes --queue-url "$url" --attribute-names "$2" --query "Attributes.$2" --output text
}
function_field() { awsm lambda get-function-configuration --function-name "$1" --query "$2" --output text; }
# The completion rule: "State|pattern as sorted compact JSON", and its targets as
# "Id|Arn" lines.
completion_rule() {
  awsm events describe-rule --name "$COMPLETION_RULE" --query '[State, EventPattern]' --output json 2>/dev/null |
    python3 -c '
import json, sys
state, pattern = json.load(sys.stdin)
print(state + "|" + json.dumps(json.loads(pattern), sort_keys=True, separators=(",", ":")))
' || true
}
COMPLETION_PATTERN_SORTED='{"detail-type":["Storage Gateway Refresh Cache Event"],"source":["aws.storagegateway"]}'
completion_targets() {
  awsm events list-targets-by-rule --rule "$COMPLETION_RULE" --query 'Targets[].[Id, Arn]' --output text | tr '\t' '|'
}
# The statements of a queue's policy as "Sid|Principal|Action|Resource|Condition",
# the condition as sorted compact JSON, one line each, sorted.
policy_statements() { # QUEUE
  local url
  url=$(awsm sqs get-queue-url --queue-name "$1" --query QueueUrl --output text)
  awsm sqs get-queue-attributes --queue-url "$url" --attribute-names Policy --query Attributes.Policy --output text |
    python3 -c '
import json, sys
text = sys.stdin.read().strip()
if text and text != "None":
    for s in json.loads(text)["Statement"]:
        print("|".join([s.get("Sid", ""), json.dumps(s.get("Principal"), sort_keys=True), s["Action"], s["Resource"],
            json.dumps(s.get("Condition"), sort_keys=True, separators=(",", ":"))]))
' | sort
}
# Our statement in the action queue's policy (iam/action-queue-policy.json).
completion_statement() {
  printf 'EventBridgeSendsRefreshCompletions|{"Service": "events.amazonaws.com"}|sqs:SendMessage|%s|{"ArnEquals":{"aws:SourceArn":"%s"}}' \
    "$SQS_ARN:$ACTION_QUEUE" "$COMPLETION_RULE_ARN"
}
# check_completion: the rule, its one target, and our statement (with OTHER_STATEMENTS,
# lines that must be in the policy too).
check_completion() { # WHEN
  check_eq "rule $COMPLETION_RULE: state and event pattern ($1)" "ENABLED|$COMPLETION_PATTERN_SORTED" "$(completion_rule)"
  check_eq "rule $COMPLETION_RULE: one target, the action queue ($1)" "ActionQueue|$SQS_ARN:$ACTION_QUEUE" "$(completion_targets)"
  check_eq "queue $ACTION_QUEUE policy: EventBridge may send, for the rule only (ArnEquals aws:SourceArn) ($1)" \
    "$(printf '%s\n' "$(completion_statement)" ${OTHER_STATEMENTS:+"$OTHER_STATEMENTS"} | sort)" \
    "$(policy_statements "$ACTION_QUEUE")"
}
OTHER_STATEMENTS=
# The rendered policy document that the scripts must have deployed, without white space.
expected_policy() { # TEMPLATE FUNCTION
  sed -e "s/REGION/$REGION/g" -e "s/ACCOUNT_ID/$ACCOUNT/g" -e "s/TABLE_NAME/$TABLE/g" \
    -e "s/ACTION_QUEUE/$ACTION_QUEUE/g" -e "s/INGEST_QUEUE/$INGEST_QUEUE/g" \
    -e "s/AGGREGATOR_DLQ/$AGGREGATOR_DLQ/g" -e "s/EVENT_RULE/$EVENT_RULE/g" \
    -e "s/FUNCTION_NAME/$2/g" "$ROOT/iam/$1" | tr -d '[:space:]'
}
deployed_policy() { # POLICY_NAME
  local arn=arn:aws:iam::$ACCOUNT:policy/$1 version
  version=$(awsm iam get-policy --policy-arn "$arn" --query Policy.DefaultVersionId --output text)
  awsm iam get-policy-version --policy-arn "$arn" --version-id "$version" --query PolicyVersion.Document --output json |
    tr -d '[:space:]'
}
count_prefixed() { # what: roles policies queues functions loggroups
  case $1 in
    roles) awsm iam list-roles --query "length(Roles[?starts_with(RoleName, '$PREFIX')])" --output text ;;
    policies) awsm iam list-policies --scope Local --query "length(Policies[?starts_with(PolicyName, '$PREFIX')])" --output text ;;
    queues) awsm sqs list-queues --queue-name-prefix "$PREFIX" --query "length(QueueUrls || \`[]\`)" --output text ;;
    functions) awsm lambda list-functions --query "length(Functions[?starts_with(FunctionName, '$PREFIX')])" --output text ;;
    loggroups) awsm logs describe-log-groups --log-group-name-prefix "/aws/lambda/$PREFIX" --query 'length(logGroups)' --output text ;;
    tables) awsm dynamodb list-tables --query "length(TableNames[?@ == '$TABLE'])" --output text ;;
    mappings) awsm lambda list-event-source-mappings --event-source-arn "$SQS_ARN:$ACTION_QUEUE" --query 'length(EventSourceMappings)' --output text ;;
    ingestmappings) awsm lambda list-event-source-mappings --event-source-arn "$SQS_ARN:$INGEST_QUEUE" --query 'length(EventSourceMappings)' --output text ;;
    rules) awsm events list-rules --name-prefix "$PREFIX" --query 'length(Rules)' --output text ;;
  esac
}

# receive_bodies QUEUE_URL: the bodies of the messages waiting in the queue (one
# receive of up to 10), one JSON document per line.
receive_bodies() {
  awsm sqs receive-message --queue-url "$1" --max-number-of-messages 10 --wait-time-seconds 1 \
    --query 'Messages[].Body' --output json | python3 -c '
import json, sys
for body in json.load(sys.stdin) or []:
    print(json.dumps(json.loads(body)))
'
}
# account_state BUCKET...: every resource the stacks and the 2018 deployment touch,
# as sorted JSON (no timestamps, revisions or message counts), for "nothing changed";
# the EventBridge rules of OTHER_REGION and THIRD_REGION too (the forwarding rules).
# Needs boto3 (moto's own dependency).
account_state() {
  python3 - "$AWS_ENDPOINT_URL" "$REGION" "$OTHER_REGION $THIRD_REGION" "$@" <<'PY2'
import json, sys
import boto3
from botocore.exceptions import ClientError
endpoint, region, other_regions, buckets = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
def client(name):
    return boto3.client(name, endpoint_url=endpoint, region_name=region)
lam, s3, iam, sqs, ddb, ev, logs = (client(n) for n in ("lambda", "s3", "iam", "sqs", "dynamodb", "events", "logs"))
def get(f, *keys, **kw):
    try:
        r = f(**kw)
    except ClientError as e:
        return "absent: " + e.response["Error"]["Code"]
    r.pop("ResponseMetadata", None)
    for k in keys:
        r = r.get(k) if isinstance(r, dict) else None
    return r
out = {"functions": {}, "buckets": {}, "roles": {}, "policies": {}, "queues": {}, "tables": {}, "rules": {}}
for f in lam.list_functions()["Functions"]:
    name = f["FunctionName"]
    c = get(lam.get_function_configuration, FunctionName=name)
    policy = get(lam.get_policy, "Policy", FunctionName=name)
    invoke = get(lam.get_function_event_invoke_config, FunctionName=name)
    out["functions"][name] = {
        "config": {k: c.get(k) for k in ("Runtime", "Handler", "Role", "Timeout", "MemorySize", "Environment", "Architectures", "CodeSize")},
        "concurrency": get(lam.get_function_concurrency, "ReservedConcurrentExecutions", FunctionName=name),
        "permissions": sorted(s["Sid"] for s in json.loads(policy)["Statement"]) if isinstance(policy, str) and not policy.startswith("absent") else policy,
        "invoke_config": {k: v for k, v in invoke.items() if k != "LastModified"} if isinstance(invoke, dict) else invoke,
    }
out["mappings"] = sorted([m["UUID"], m["FunctionArn"], m["EventSourceArn"], m["State"], m["BatchSize"]]
    for m in lam.list_event_source_mappings()["EventSourceMappings"])
for b in buckets:
    out["buckets"][b] = get(s3.get_bucket_notification_configuration, Bucket=b)
for r in iam.list_roles()["Roles"]:
    name = r["RoleName"]
    out["roles"][name] = {
        "attached": sorted(p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]),
        "inline": {p: iam.get_role_policy(RoleName=name, PolicyName=p)["PolicyDocument"] for p in iam.list_role_policies(RoleName=name)["PolicyNames"]},
        "trust": r["AssumeRolePolicyDocument"],
        "tags": sorted([t["Key"], t["Value"]] for t in iam.list_role_tags(RoleName=name)["Tags"]),
    }
for p in iam.list_policies(Scope="Local")["Policies"]:
    out["policies"][p["PolicyName"]] = [p["DefaultVersionId"], p["AttachmentCount"]]
for url in sqs.list_queues().get("QueueUrls", []):
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    out["queues"][url] = {k: (json.loads(v) if k in ("Policy", "RedrivePolicy") else v) for k, v in a.items()
        if not k.startswith("Approximate") and k != "LastModifiedTimestamp"}
for t in ddb.list_tables()["TableNames"]:
    d = ddb.describe_table(TableName=t)["Table"]
    out["tables"][t] = {"keys": d["KeySchema"], "created": str(d["CreationDateTime"]),
        "billing": (d.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED"),
        "items": sorted(json.dumps(i, sort_keys=True) for i in ddb.scan(TableName=t)["Items"])}
for rule_region in [region] + other_regions:
    evr = boto3.client("events", endpoint_url=endpoint, region_name=rule_region)
    key = "rules" if rule_region == region else "rules@" + rule_region
    out.setdefault(key, {})
    for r in evr.list_rules()["Rules"]:
        out[key][r["Name"]] = [r.get("State"), r.get("EventPattern"),
            sorted([t["Id"], t["Arn"], t.get("RoleArn")] for t in evr.list_targets_by_rule(Rule=r["Name"])["Targets"])]
out["loggroups"] = sorted([g["logGroupName"], g.get("retentionInDays")] for g in logs.describe_log_groups()["logGroups"])
print(json.dumps(out, sort_keys=True, indent=1, default=str))
PY2
}
# check_state WHAT EXPECTED_FILE BUCKET...: the account's state equals the file's.
check_state() {
  local what=$1 expected=$2
  shift 2
  account_state "$@" >"$WORK/state-now.json"
  if cmp -s "$expected" "$WORK/state-now.json"; then
    pass "$what: nothing changed"
  else
    fail "$what: nothing changed" "$(diff "$expected" "$WORK/state-now.json" | head -n 40)"
  fi
}
# The forwarding rule COMPLETION_RULE in another region: "State|pattern as sorted
# compact JSON" (nothing when absent), and its targets as "Id|Arn|RoleArn" lines.
forwarding_rule() { # REGION
  awsr "$1" events describe-rule --name "$COMPLETION_RULE" --query '[State, EventPattern]' --output json 2>/dev/null |
    python3 -c '
import json, sys
state, pattern = json.load(sys.stdin)
print(state + "|" + json.dumps(json.loads(pattern), sort_keys=True, separators=(",", ":")))
' || true
}
forwarding_targets() { # REGION
  awsr "$1" events list-targets-by-rule --rule "$COMPLETION_RULE" --query 'Targets[].[Id, Arn, RoleArn]' --output text 2>/dev/null |
    tr '\t' '|' || true
}
# The forwarder role's inline policy, as "Effect|Action|Resource" lines, one per
# statement and action, sorted.
forwarder_grants() {
  awsm iam get-role-policy --role-name "$FORWARDER_ROLE" --policy-name "$FORWARDER_POLICY" --query PolicyDocument --output json |
    python3 -c '
import json, sys
doc = json.load(sys.stdin)
statements = doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]
for s in statements:
    actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
    resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
    for a in actions:
        for r in resources:
            print("|".join([s["Effect"], a, r]))
' | sort
}
role_count() { awsm iam list-roles --query "length(Roles[?RoleName == '$1'])" --output text; }
# check_forwarding WHEN REGION...: the forwarding rule in each REGION (the completion
# pattern, one target: the stack's region's default event bus, with the role), and the
# role: trusted by EventBridge, allowed only events:PutEvents on that bus, its tag
# naming the regions.
check_forwarding() {
  local when=$1 region
  shift
  for region in "$@"; do
    check_eq "rule $COMPLETION_RULE in $region: state and event pattern (the completion pattern) ($when)" \
      "ENABLED|$COMPLETION_PATTERN_SORTED" "$(forwarding_rule "$region")"
    check_eq "rule $COMPLETION_RULE in $region: one target, the default event bus of $REGION, with the role ($when)" \
      "HomeEventBus|$HOME_BUS_ARN|arn:aws:iam::$ACCOUNT:role/$FORWARDER_ROLE" "$(forwarding_targets "$region")"
  done
  check_eq "role $FORWARDER_ROLE trust policy = iam/events-trust.json ($when)" "$(tr -d '[:space:]' <"$ROOT/iam/events-trust.json")" \
    "$(awsm iam get-role --role-name "$FORWARDER_ROLE" --query Role.AssumeRolePolicyDocument --output json | tr -d '[:space:]')"
  check_eq "role $FORWARDER_ROLE: no managed policy ($when)" "" \
    "$(awsm iam list-attached-role-policies --role-name "$FORWARDER_ROLE" --query 'AttachedPolicies[].PolicyName' --output text)"
  check_eq "role $FORWARDER_ROLE: one inline policy ($when)" "$FORWARDER_POLICY" \
    "$(awsm iam list-role-policies --role-name "$FORWARDER_ROLE" --query 'PolicyNames[]' --output text)"
  check_eq "role $FORWARDER_ROLE inline policy = iam/events-forwarder-policy.json rendered ($when)" \
    "$(expected_policy events-forwarder-policy.json "")" \
    "$(awsm iam get-role-policy --role-name "$FORWARDER_ROLE" --policy-name "$FORWARDER_POLICY" --query PolicyDocument --output json | tr -d '[:space:]')"
  check_eq "role $FORWARDER_ROLE may only events:PutEvents on $HOME_BUS_ARN ($when)" \
    "Allow|events:PutEvents|$HOME_BUS_ARN" "$(forwarder_grants)"
  check_eq "role $FORWARDER_ROLE tag s3ea:forwarding-regions ($when)" "$(printf '%s\n' "$@" | sort | tr '\n' ' ' | sed 's/ $//')" \
    "$(awsm iam list-role-tags --role-name "$FORWARDER_ROLE" --query "Tags[?Key == 's3ea:forwarding-regions'].Value | [0]" --output text)"
}
# check_no_forwarding WHEN REGION...: no rule COMPLETION_RULE in each REGION, no role.
check_no_forwarding() {
  local when=$1 region
  shift
  for region in "$@"; do
    check_eq "rule $COMPLETION_RULE in $region ($when)" "" "$(forwarding_rule "$region")"
  done
  check_eq "role $FORWARDER_ROLE ($when)" 0 "$(role_count "$FORWARDER_ROLE")"
}
# completion_event SHARE_REGION NOTIFICATION_ID: a "Storage Gateway Refresh Cache
# Event" as Storage Gateway puts it on its region's bus (put-events entries).
completion_event() {
  python3 -c '
import json, sys
region, account, nid = sys.argv[1:4]
print(json.dumps([{"Source": "aws.storagegateway", "DetailType": "Storage Gateway Refresh Cache Event",
    "Resources": ["arn:aws:storagegateway:%s:%s:share/share-0123ABCD" % (region, account)],
    "Detail": json.dumps({"folderList": ["/"], "shareId": "share-0123ABCD", "notificationId": nid})}]))
' "$1" "$ACCOUNT" "$2"
}
# completion_bodies QUEUE_URL: the completion events waiting in the queue, as
# "source|detail-type|notificationId" lines.
completion_bodies() {
  receive_bodies "$1" | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("|".join([e.get("source", ""), e.get("detail-type", ""), e.get("detail", {}).get("notificationId", "")]))
'
}
# env_of FUNCTION: its variables as "KEY=VALUE" words, sorted.
env_of() {
  awsm lambda get-function-configuration --function-name "$1" --query 'Environment.Variables' --output json |
    python3 -c 'import json, sys; print(" ".join("%s=%s" % kv for kv in sorted((json.load(sys.stdin) or {}).items())))'
}
# The staleness bound B and the StalenessTooHigh threshold, in ms, for the window W
# and the interval I (docs/operating.md, Alarms and the dashboard; docs/protocol.md, "The
# staleness bound"): B = W + 1 + 60 x ceil(W / 900) + 5 x (P + 60), P = I + 1 (0 when
# I is 0); the threshold is B + 600 s.
bound_ms() { # W I
  python3 -c '
import math, sys
w, i = int(sys.argv[1]), int(sys.argv[2])
print(1000 * (w + 1 + 60 * max(1, math.ceil(w / 900)) + 5 * ((i + 1 if i > 0 else 0) + 60)))
' "$1" "$2"
}
staleness_ms() { echo $(($(bound_ms "$1" "$2") + 600000)); }
STATE_CHECKS=true
if [ -n "$BUCKET_SUFFIX" ] || ! python3 -c 'import boto3' 2>/dev/null; then
  # The snapshots cover the whole account: on a shared moto server they would see the
  # other users' changes.
  STATE_CHECKS=false
fi

# ---------------------------------------------------------------------------------
phase "Command line"
for script in create-stack attach-bucket detach-bucket delete-stack; do
  check_run "$script.sh --help" 0 "scripts/$script.sh" --help
  check_log_has "$script.sh --help prints the usage line" "^usage: scripts/$script.sh"
  check_run "$script.sh --no-such-option" 2 "scripts/$script.sh" --no-such-option bucket-x
  check_log_has "$script.sh --no-such-option prints the usage line" "^usage: scripts/$script.sh"
done
check_run "create-stack.sh without BUCKET" 2 scripts/create-stack.sh
check_run "attach-bucket.sh without BUCKET" 2 scripts/attach-bucket.sh
check_run "detach-bucket.sh without BUCKET" 2 scripts/detach-bucket.sh
check_run "create-stack.sh --prefix without a value" 2 scripts/create-stack.sh bucket-x --prefix
check_run "create-stack.sh --delay 43201" 2 scripts/create-stack.sh --delay 43201 bucket-x
check_run "create-stack.sh --log-level LOUD" 2 scripts/create-stack.sh --log-level LOUD bucket-x
check_run "create-stack.sh --log-format xml" 2 scripts/create-stack.sh --log-format xml bucket-x
check_log_has "create-stack.sh names the accepted log formats" "invalid --log-format 'xml': json or text"
check_run "create-stack.sh --arch sparc" 2 scripts/create-stack.sh --arch sparc bucket-x
check_run "create-stack.sh --help" 0 scripts/create-stack.sh --help
check_log_has "create-stack.sh --help documents --gateway-regions" "--gateway-regions R1,R2"
check_log_has "create-stack.sh --help says that a re-run keeps GATEWAY_REGIONS" "without it leaves"
check_log_has "create-stack.sh --help documents --alarm-topic" "--alarm-topic ARN"
check_log_has "create-stack.sh --help says that a re-run without it keeps the alarms" "without it keeps"
for bad in not-an-arn "arn:aws:sns:eu-west-1:12345:ops" "arn:aws:sqs:eu-west-1:123456789012:ops" \
  "arn:aws:sns:eu-west-1:123456789012:ops.fifo" "arn:aws:sns:eu-west-1:123456789012:"; do
  check_run "create-stack.sh --alarm-topic '$bad'" 2 scripts/create-stack.sh --alarm-topic "$bad" bucket-x
done
check_log_has "it says what an alarm topic looks like" "arn:aws:sns:REGION:ACCOUNT:NAME"
check_run "create-stack.sh --alarm-topic without a value" 2 scripts/create-stack.sh bucket-x --alarm-topic
for bad in "US-EAST-1" "us-east-1,us-east-1" "us-east-1," "us-east-1,,eu-west-1" "us-east" "us-east-1 eu-west-1"; do
  check_run "create-stack.sh --gateway-regions '$bad'" 2 scripts/create-stack.sh --gateway-regions "$bad" bucket-x
  check_log_has "--gateway-regions '$bad' names the accepted values" \
    "invalid --gateway-regions '$(ere "$bad")': a comma-separated list of distinct AWS region names such as us-east-1,eu-west-2"
done
check_run "create-stack.sh --gateway-regions= (empty)" 2 scripts/create-stack.sh --gateway-regions= bucket-x
for bad in -1 3601 abc 1.5 " 60" 99999999999999999999; do
  check_run "create-stack.sh --min-refresh-interval '$bad'" 2 scripts/create-stack.sh --min-refresh-interval "$bad" bucket-x
  check_log_has "--min-refresh-interval '$bad' names the accepted values" \
    "invalid --min-refresh-interval '$(ere "$bad")': a whole number of seconds from 0 to 3600"
done
check_run "create-stack.sh --min-refresh-interval= (empty)" 2 scripts/create-stack.sh --min-refresh-interval= bucket-x
check_run "MIN_REFRESH_INTERVAL_SECONDS=1h create-stack.sh" 2 env MIN_REFRESH_INTERVAL_SECONDS=1h scripts/create-stack.sh bucket-x
check_run "create-stack.sh --min-refresh-interval without a value" 2 scripts/create-stack.sh bucket-x --min-refresh-interval
for short in 0 30 59; do
  check_run "create-stack.sh --min-refresh-interval $short without the acknowledgement" 2 \
    scripts/create-stack.sh --min-refresh-interval "$short" bucket-x
  check_log_has "--min-refresh-interval $short names the acknowledgement (option and variable) in one line" \
    "^create-stack.sh: --min-refresh-interval $short is below 60 s, .*deletes may stay visible.*: pass --allow-short-refresh-interval \\(or ALLOW_SHORT_REFRESH_INTERVAL=true\\) to accept that\$"
done
check_run "MIN_REFRESH_INTERVAL_SECONDS=30 create-stack.sh (the variable needs it too)" 2 \
  env MIN_REFRESH_INTERVAL_SECONDS=30 scripts/create-stack.sh bucket-x
check_run "create-stack.sh --min-refresh-interval 30 with ALLOW_SHORT_REFRESH_INTERVAL=false" 2 \
  env ALLOW_SHORT_REFRESH_INTERVAL=false scripts/create-stack.sh --min-refresh-interval 30 bucket-x
check_run "ALLOW_SHORT_REFRESH_INTERVAL=yes create-stack.sh" 2 env ALLOW_SHORT_REFRESH_INTERVAL=yes scripts/create-stack.sh bucket-x
check_log_has "ALLOW_SHORT_REFRESH_INTERVAL=yes names the accepted values" "invalid ALLOW_SHORT_REFRESH_INTERVAL 'yes': true or false"
check_run "create-stack.sh --migrate --prefix Other" 2 scripts/create-stack.sh --migrate --prefix Other bucket-x
check_log_has "--migrate names the prefix it needs" "--migrate takes a 2018 deployment over into the stack of the default prefix S3EventAggregator"
check_run "create-stack.sh --help" 0 scripts/create-stack.sh --help
check_log_has "create-stack.sh --help documents --min-refresh-interval" "--min-refresh-interval SECONDS"
check_log_has "create-stack.sh --help says that a re-run keeps MIN_REFRESH_INTERVAL_SECONDS" "A re-run without it keeps the current value"
check_log_has "create-stack.sh --help documents --allow-short-refresh-interval" "--allow-short-refresh-interval"
check_log_has "create-stack.sh --help says why an interval below 60 s needs it" "may not evict the"
check_log_has "create-stack.sh --help documents the forwarding rules" "forwards its gateways'"
check_log_has "create-stack.sh --help documents --migrate" "--migrate +take over a deployment of the 2018 scripts"
check_run "GATEWAY_REGIONS=useast1 create-stack.sh" 2 env GATEWAY_REGIONS=useast1 scripts/create-stack.sh bucket-x
check_run "attach-bucket.sh with two buckets" 2 scripts/attach-bucket.sh bucket-x bucket-y
for script in create-stack attach-bucket; do
  check_run "$script.sh --help" 0 "scripts/$script.sh" --help
  check_log_has "$script.sh --help documents --ingest" "--ingest (MODE|direct\\|sqs\\|eventbridge)"
  check_run "$script.sh --ingest kafka" 2 "scripts/$script.sh" --ingest kafka bucket-x
  check_log_has "$script.sh --ingest kafka names the accepted values" "invalid --ingest 'kafka': direct, sqs or eventbridge"
  check_run "$script.sh --ingest without a value" 2 "scripts/$script.sh" bucket-x --ingest
done
check_run "create-stack.sh --ingest= (empty)" 2 scripts/create-stack.sh --ingest= bucket-x
check_run "S3EA_INGEST=pubsub create-stack.sh" 2 env S3EA_INGEST=pubsub scripts/create-stack.sh bucket-x
check_log_has "S3EA_INGEST=pubsub names the accepted values" "invalid --ingest 'pubsub': direct, sqs or eventbridge"

# The IAM propagation retry (scripts/lib/stack.sh), with a stand-in for the step: it
# fails twice the way Lambda does with a role that IAM has not propagated yet.
flaky_step() {
  local count
  count=$(($(cat "$WORK/attempts") + 1))
  echo "$count" >"$WORK/attempts"
  if [ "$count" -lt "$1" ]; then
    echo "An error occurred (InvalidParameterValueException) when calling the CreateFunction operation: The role defined for the function cannot be assumed by Lambda." >&2
    return 255
  fi
  echo "ran"
}
retry_case() { # FAIL_UNTIL: runs flaky_step under retry_for_iam in a subshell
  echo 0 >"$WORK/attempts"
  (
    # shellcheck source=/dev/null # its names would shadow the test's own (SC2031)
    . scripts/lib/stack.sh
    retry_for_iam "test step" "$@"
  )
}
check_run "retry_for_iam: a step that fails twice with 'cannot be assumed by Lambda'" 0 retry_case flaky_step 3
check_eq "retry_for_iam: attempts" 3 "$(cat "$WORK/attempts")"
check_log_has "retry_for_iam says why it waits" "IAM change not visible to Lambda yet \\(attempt 2\\)"
other_error() { echo 1 >"$WORK/attempts"; echo "An error occurred (ResourceConflictException): exists" >&2; return 255; }
check_run "retry_for_iam: any other error fails at once" 1 retry_case other_error
check_eq "retry_for_iam: attempts after another error" 1 "$(cat "$WORK/attempts")"

# ---------------------------------------------------------------------------------
phase "1. Buckets, and a foreign notification configuration on $ONE"
for bucket in "$ONE" "$TWO" "$THREE"; do
  awsm s3api create-bucket --bucket "$bucket" --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
done
FOREIGN_QUEUE_URL=$(awsm sqs create-queue --queue-name "foreign-events$BUCKET_SUFFIX" --query QueueUrl --output text)
FOREIGN_QUEUE_ARN=$(awsm sqs get-queue-attributes --queue-url "$FOREIGN_QUEUE_URL" --attribute-names QueueArn --query Attributes.QueueArn --output text)
# A queue entry and another team's Lambda entry; their event types do not overlap ours.
awsm s3api put-bucket-notification-configuration --bucket "$ONE" --notification-configuration "{
  \"QueueConfigurations\": [{\"Id\": \"foreign-queue\", \"QueueArn\": \"$FOREIGN_QUEUE_ARN\",
    \"Events\": [\"s3:ObjectRestore:Completed\"],
    \"Filter\": {\"Key\": {\"FilterRules\": [{\"Name\": \"prefix\", \"Value\": \"archive/\"}]}}}],
  \"LambdaFunctionConfigurations\": [{\"Id\": \"foreign-lambda\",
    \"LambdaFunctionArn\": \"arn:aws:lambda:$REGION:$ACCOUNT:function:SomeoneElsesFunction\",
    \"Events\": [\"s3:ObjectTagging:*\"]}]}"
FOREIGN=$(foreign_entries "$ONE")
check_run "create-stack.sh with a bucket that does not exist" 1 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "s3ea-missing$BUCKET_SUFFIX"
check_log_has "it names the missing bucket" "bucket s3ea-missing$BUCKET_SUFFIX does not exist"
awsm s3api create-bucket --bucket "s3ea-elsewhere$BUCKET_SUFFIX" --region us-west-2 \
  --create-bucket-configuration LocationConstraint=us-west-2 >/dev/null
check_run "create-stack.sh with a bucket in another region" 1 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" "s3ea-elsewhere$BUCKET_SUFFIX"
check_log_has "it names the regions" "is in us-west-2, the stack in $REGION"
check_eq "nothing created by the failed runs (tables named $TABLE)" 0 "$(count_prefixed tables)"
check_eq "foreign entries (queue, lambda) on $ONE before create" "1	1" \
  "$(awsm s3api get-bucket-notification-configuration --bucket "$ONE" --query '[length(QueueConfigurations), length(LambdaFunctionConfigurations)]' --output text)"

# ---------------------------------------------------------------------------------
phase "2. create-stack.sh with two buckets (deploy tool: cargo lambda deploy)"
start=$(date +%s)
check_run "create-stack.sh --delay 45 --log-level debug $ONE $TWO" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --delay 45 --log-level debug "$ONE" "$TWO"
echo "      (create took $(($(date +%s) - start)) s; output: $LAST_LOG)"
check_log_has "create prints the account and region" "Target: account $ACCOUNT, region $REGION"
check_log_has "create prints the ARN summary" "aggregator +$AGGREGATOR_ARN"
check_log_has "create deployed with cargo lambda deploy" "cargo-lambda\\)"

# ---------------------------------------------------------------------------------
phase "3. The resources"
ZIP_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/lambda

# Everything but the buckets: table, queues, IAM, functions, mapping, log groups.
check_resources() { # DELAY LOG_LEVEL
  local timeout

  # DynamoDB
  check_eq "table $TABLE key schema" "BucketName	HASH" \
    "$(awsm dynamodb describe-table --table-name "$TABLE" --query 'Table.KeySchema[0].[AttributeName, KeyType]' --output text)"
  check_eq "table $TABLE key type and billing mode" "S	PAY_PER_REQUEST	ACTIVE" \
    "$(awsm dynamodb describe-table --table-name "$TABLE" --query 'Table.[AttributeDefinitions[0].AttributeType, BillingModeSummary.BillingMode, TableStatus]' --output text)"

  # SQS
  timeout=$(function_field "$REFRESHER" Timeout)
  check_ge "queue $ACTION_QUEUE visibility timeout vs 6 x refresher timeout ($timeout s)" \
    $((6 * timeout)) "$(queue_attribute "$ACTION_QUEUE" VisibilityTimeout)"
  check_eq "queue $ACTION_QUEUE redrive policy" "$SQS_ARN:$ACTION_DLQ maxReceiveCount=10" \
    "$(queue_attribute "$ACTION_QUEUE" RedrivePolicy | python3 -c 'import json, sys; p = json.load(sys.stdin); print(p["deadLetterTargetArn"], "maxReceiveCount=%s" % p["maxReceiveCount"])')"
  for queue in "$ACTION_QUEUE" "$ACTION_DLQ" "$AGGREGATOR_DLQ"; do
    check_eq "queue $queue SSE (SqsManagedSseEnabled)" true "$(queue_attribute "$queue" SqsManagedSseEnabled)"
  done
  check_eq "queue $ACTION_DLQ retention" 1209600 "$(queue_attribute "$ACTION_DLQ" MessageRetentionPeriod)"
  check_eq "queue $AGGREGATOR_DLQ retention" 1209600 "$(queue_attribute "$AGGREGATOR_DLQ" MessageRetentionPeriod)"

  # IAM
  for role in "$AGGREGATOR_ROLE" "$REFRESHER_ROLE"; do
    check_eq "role $role trust policy" "$(tr -d '[:space:]' <"$ROOT/iam/lambda-trust.json")" \
      "$(awsm iam get-role --role-name "$role" --query Role.AssumeRolePolicyDocument --output json | tr -d '[:space:]')"
  done
  check_eq "role $AGGREGATOR_ROLE attached policies" "$AGGREGATOR_POLICY" \
    "$(awsm iam list-attached-role-policies --role-name "$AGGREGATOR_ROLE" --query 'AttachedPolicies[].PolicyName' --output text)"
  check_eq "role $REFRESHER_ROLE attached policies" "$REFRESHER_POLICY" \
    "$(awsm iam list-attached-role-policies --role-name "$REFRESHER_ROLE" --query 'AttachedPolicies[].PolicyName' --output text)"
  check_eq "policy $AGGREGATOR_POLICY document = iam/aggregator-policy.json rendered" \
    "$(expected_policy aggregator-policy.json "$AGGREGATOR")" "$(deployed_policy "$AGGREGATOR_POLICY")"
  check_eq "policy $REFRESHER_POLICY document = iam/refresher-policy.json rendered" \
    "$(expected_policy refresher-policy.json "$REFRESHER")" "$(deployed_policy "$REFRESHER_POLICY")"

  check_functions "$1" "$2"
  check_eq "function $REFRESHER reserved concurrency" 2 \
    "$(awsm lambda get-function-concurrency --function-name "$REFRESHER" --query ReservedConcurrentExecutions --output text)"
  check_eq "function $AGGREGATOR reserved concurrency (none: unreserved)" None \
    "$(awsm lambda get-function-concurrency --function-name "$AGGREGATOR" --query ReservedConcurrentExecutions --output text)"
  check_eq "function $AGGREGATOR async retries, max event age, on-failure destination" \
    "2	21600	$SQS_ARN:$AGGREGATOR_DLQ" \
    "$(awsm lambda get-function-event-invoke-config --function-name "$AGGREGATOR" --query '[MaximumRetryAttempts, MaximumEventAgeInSeconds, DestinationConfig.OnFailure.Destination]' --output text)"
  check_eq "event source mappings of $REFRESHER" 1 "$(count_prefixed mappings)"
  check_eq "event source mapping: queue, function, batch, response types, max concurrency, state" \
    "$SQS_ARN:$ACTION_QUEUE	arn:aws:lambda:$REGION:$ACCOUNT:function:$REFRESHER	10	ReportBatchItemFailures	2	Enabled" \
    "$(awsm lambda list-event-source-mappings --function-name "$REFRESHER" --query "EventSourceMappings[0].[EventSourceArn, FunctionArn, BatchSize, join(',', FunctionResponseTypes), ScalingConfig.MaximumConcurrency, State]" --output text)"
  check_completion "$1 s, $2"
  for group in "$AGGREGATOR" "$REFRESHER"; do
    check_eq "log group /aws/lambda/$group retention" 30 \
      "$(awsm logs describe-log-groups --log-group-name-prefix "/aws/lambda/$group" --query "logGroups[?logGroupName == '/aws/lambda/$group'] | [0].retentionInDays" --output text)"
  done
}

# The functions' configuration, code and environment.
check_functions() { # DELAY LOG_LEVEL
  local delay=$1 level=$2 url
  url=$(awsm sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text)
  check_eq "function $AGGREGATOR runtime, handler, architecture, timeout, memory, role" \
    "provided.al2023	bootstrap	arm64	30	128	arn:aws:iam::$ACCOUNT:role/$AGGREGATOR_ROLE" \
    "$(function_field "$AGGREGATOR" '[Runtime, Handler, Architectures[0], Timeout, MemorySize, Role]')"
  check_eq "function $REFRESHER runtime, handler, architecture, timeout, memory, role" \
    "provided.al2023	bootstrap	arm64	60	128	arn:aws:iam::$ACCOUNT:role/$REFRESHER_ROLE" \
    "$(function_field "$REFRESHER" '[Runtime, Handler, Architectures[0], Timeout, MemorySize, Role]')"
  check_eq "function $AGGREGATOR environment" \
    "$(printf '%s\n' "LOG_LEVEL=$level" "QUEUE_URL=$url" "REFRESH_DELAY_SECONDS=$delay" "TABLE_NAME=$TABLE" \
      ${AGGREGATOR_EXTRA_ENV:+"$AGGREGATOR_EXTRA_ENV"} | sort | tr '\n' ' ' | sed 's/ $//')" \
    "$(awsm lambda get-function-configuration --function-name "$AGGREGATOR" --query 'Environment.Variables' --output json | python3 -c 'import json, sys; print(" ".join("%s=%s" % kv for kv in sorted(json.load(sys.stdin).items())))')"
  check_eq "function $REFRESHER environment" \
    "$(printf '%s\n' "LOG_LEVEL=$level" "TABLE_NAME=$TABLE" "MIN_REFRESH_INTERVAL_SECONDS=$MIN_INTERVAL" \
      ${REFRESHER_EXTRA_ENV:+"$REFRESHER_EXTRA_ENV"} | sort | tr '\n' ' ' | sed 's/ $//')" \
    "$(awsm lambda get-function-configuration --function-name "$REFRESHER" --query 'Environment.Variables' --output json | python3 -c 'import json, sys; print(" ".join("%s=%s" % kv for kv in sorted(json.load(sys.stdin).items())))')"
  for pair in "$AGGREGATOR:aggregator" "$REFRESHER:refresher"; do
    check_eq "function ${pair%%:*} code size = size of $ZIP_DIR/${pair#*:}/bootstrap.zip" \
      "$(wc -c <"$ZIP_DIR/${pair#*:}/bootstrap.zip" | tr -d ' ')" "$(function_field "${pair%%:*}" CodeSize)"
  done
}

# Per bucket: one permission with both source conditions, and our one entry; and
# nothing for any other bucket.
check_buckets() { # BUCKET...
  local bucket perms
  perms=$(permissions)
  check_eq "permission statements on $AGGREGATOR" "$#" "$(count_lines "$perms")"
  for bucket in "$@"; do
    check_eq "permission for $bucket (s3.amazonaws.com, SourceArn, SourceAccount)" \
      "$(permission_line "$bucket")" "$(printf '%s\n' "$perms" | grep -F "S3Invoke-$bucket|" || true)"
    check_eq "notification entry on $bucket (with the lifecycle expirations)" \
      "$NOTIFICATION_ID|$AGGREGATOR_ARN|$OUR_EVENTS" "$(our_entries "$bucket")"
  done
}

check_foreign_intact() {
  check_eq "foreign entries on $ONE unchanged ($1)" "$FOREIGN" "$(foreign_entries "$ONE")"
}

AGGREGATOR_EXTRA_ENV=
# GATEWAY_REGIONS is not set until --gateway-regions: the refresher's own region.
REFRESHER_EXTRA_ENV=
# MIN_REFRESH_INTERVAL_SECONDS: the refresher's default, written out.
MIN_INTERVAL=60
check_resources 45 DEBUG
check_buckets "$ONE" "$TWO"
check_foreign_intact "after create"
# A variable that the operator adds by hand (with a comma in its value) must survive
# the next runs of create-stack.sh, on both deploy paths.
AGGREGATOR_EXTRA_ENV="RUST_LOG=info,shared=debug"
awsm lambda update-function-configuration --function-name "$AGGREGATOR" --environment "{\"Variables\": {
  \"QUEUE_URL\": \"$(awsm sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text)\",
  \"REFRESH_DELAY_SECONDS\": \"45\", \"LOG_LEVEL\": \"DEBUG\", \"TABLE_NAME\": \"$TABLE\",
  \"RUST_LOG\": \"info,shared=debug\"}}" >/dev/null
check_eq "our entry on $THREE before attach" "" "$(our_entries "$THREE")"

# FORWARDING: the regions with a forwarding rule (the stack then has the forwarder role).
FORWARDING=
check_counts() {
  local roles=2
  if [ -n "$FORWARDING" ]; then roles=3; fi
  check_eq "roles with prefix $PREFIX ($1)${FORWARDING:+, with $FORWARDER_ROLE}" "$roles" "$(count_prefixed roles)"
  check_eq "customer managed policies with prefix $PREFIX ($1)" 2 "$(count_prefixed policies)"
  for policy in "$AGGREGATOR_POLICY" "$REFRESHER_POLICY"; do
    check_eq "versions of policy $policy ($1)" 1 \
      "$(awsm iam list-policy-versions --policy-arn "arn:aws:iam::$ACCOUNT:policy/$policy" --query 'length(Versions)' --output text)"
  done
  check_eq "queues with prefix $PREFIX ($1)" 3 "$(count_prefixed queues)"
  check_eq "functions with prefix $PREFIX ($1)" 2 "$(count_prefixed functions)"
  check_eq "log groups /aws/lambda/$PREFIX* ($1)" 2 "$(count_prefixed loggroups)"
  check_eq "tables named $TABLE ($1)" 1 "$(count_prefixed tables)"
  check_eq "event source mappings on $ACTION_QUEUE ($1)" 1 "$(count_prefixed mappings)"
  check_eq "rules with prefix $PREFIX: the completion rule ($1)" 1 "$(count_prefixed rules)"
  check_eq "targets of $COMPLETION_RULE ($1)" 1 "$(count_lines "$(completion_targets)")"
  check_eq "statements EventBridgeSendsRefreshCompletions in the policy of $ACTION_QUEUE ($1)" 1 \
    "$(policy_statements "$ACTION_QUEUE" | grep -c '^EventBridgeSendsRefreshCompletions|' || true)"
}
check_log_has "create without other gateway regions creates no forwarding rule" \
  "Completion events from the other gateway regions: none \\(GATEWAY_REGIONS names no region but $REGION\\)"
check_no_forwarding "after create" "$OTHER_REGION" "$THIRD_REGION"
check_counts "after create"

# ---------------------------------------------------------------------------------
phase "4. create-stack.sh again (deploy tool: aws lambda create-function/update-function-*): nothing duplicated"
check_log_has "the first create wrote the default MIN_REFRESH_INTERVAL_SECONDS" "Refresher minimum refresh interval: 60s \\(the default\\)"
# A statement that someone else added to the action queue's policy must survive.
ACTION_URL=$(awsm sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text)
FOREIGN_TOPIC_ARN=arn:aws:sns:$REGION:$ACCOUNT:s3ea-test-foreign$BUCKET_SUFFIX
awsm sqs get-queue-attributes --queue-url "$ACTION_URL" --attribute-names Policy --query Attributes.Policy --output text |
  python3 -c '
import json, sys
policy = json.loads(sys.stdin.read())
policy["Statement"].insert(0, {"Sid": "SomeoneElsesTopic", "Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"},
    "Action": "sqs:SendMessage", "Resource": sys.argv[1], "Condition": {"ArnEquals": {"aws:SourceArn": sys.argv[2]}}})
print(json.dumps({"Policy": json.dumps(policy)}))
' "$SQS_ARN:$ACTION_QUEUE" "$FOREIGN_TOPIC_ARN" >"$WORK/foreign-policy.json"
awsm sqs set-queue-attributes --queue-url "$ACTION_URL" --attributes "file://$WORK/foreign-policy.json"
OTHER_STATEMENTS="SomeoneElsesTopic|{\"Service\": \"sns.amazonaws.com\"}|sqs:SendMessage|$SQS_ARN:$ACTION_QUEUE|{\"ArnEquals\":{\"aws:SourceArn\":\"$FOREIGN_TOPIC_ARN\"}}"
check_completion "with a foreign statement added"
check_run "create-stack.sh --gateway-regions ' $REGION, us-west-2' --min-refresh-interval 0120 $ONE $TWO, again, with S3EA_DEPLOY_TOOL=aws-cli" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" --gateway-regions " $REGION, us-west-2" \
  --min-refresh-interval 0120 "$ONE" "$TWO"
check_log_has "second create says what it sets GATEWAY_REGIONS to" \
  "Refresher gateway regions: $REGION,us-west-2 \\(--gateway-regions\\)"
check_log_has "second create says what it sets MIN_REFRESH_INTERVAL_SECONDS to" \
  "Refresher minimum refresh interval: 120s \\(--min-refresh-interval\\)"
check_log_has "second create keeps the foreign statement of the action queue's policy" "1 other statement\\(s\\) kept"
check_log_has "second create finds the completion rule up to date" "exists, enabled, event pattern up to date"
check_log_has "second create finds the completion rule's target" "target ActionQueue: $SQS_ARN:$ACTION_QUEUE, present"
REFRESHER_EXTRA_ENV="GATEWAY_REGIONS=$REGION,us-west-2"
MIN_INTERVAL=120
check_log_has "second create finds the table" "exists \\(hash key BucketName"
check_log_has "second create finds the mapping" "exists \\([-0-9a-f]+\\): updating it"
check_log_has "second create keeps the permissions" "permission S3Invoke-$ONE: present"
# Gateways in $OTHER_REGION: their refresh-complete events reach the stack through a
# rule there whose target is the default event bus of $REGION.
check_log_has "second create says that it forwards the completion events of $OTHER_REGION" \
  "Completion events from the other gateway regions: $OTHER_REGION -> the default event bus of $REGION"
check_log_has "second create creates the role $FORWARDER_ROLE" "==> IAM role $FORWARDER_ROLE .*"
check_log_has "second create creates the forwarding rule in $OTHER_REGION" \
  "==> EventBridge rule $COMPLETION_RULE in $OTHER_REGION -> the default event bus of $REGION"
check_log_has "second create prints the forwarding rule in its summary" \
  "forwarding rule +arn:aws:events:$OTHER_REGION:$ACCOUNT:rule/$COMPLETION_RULE \\(target $HOME_BUS_ARN, role $FORWARDER_ROLE\\)"
FORWARDING=$OTHER_REGION
check_forwarding "after the second create" "$OTHER_REGION"
check_eq "rule $COMPLETION_RULE in $THIRD_REGION (not a gateway region)" "" "$(forwarding_rule "$THIRD_REGION")"
# The forwarded events keep their source and detail type, and the rule in $REGION
# names neither account nor region: they reach the action queue like local ones. (moto
# forwards source, detail type and detail; AWS forwards the event as it is.)
check_eq "rule $COMPLETION_RULE in $REGION: its pattern filters on source and detail type only (no account, no region)" \
  "detail-type,source" "$(awsm events describe-rule --name "$COMPLETION_RULE" --query EventPattern --output text |
    python3 -c 'import json, sys; print(",".join(sorted(json.load(sys.stdin))))')"
awsm sqs purge-queue --queue-url "$ACTION_URL"
awsr "$OTHER_REGION" events put-events --entries "$(completion_event "$OTHER_REGION" 5f0c2b1e-0000-4000-8000-00000000a001)" >/dev/null
check_eq "a Refresh Cache Event put on the bus of $OTHER_REGION reaches $ACTION_QUEUE (forwarding rule, then $COMPLETION_RULE)" \
  "aws.storagegateway|Storage Gateway Refresh Cache Event|5f0c2b1e-0000-4000-8000-00000000a001" "$(completion_bodies "$ACTION_URL")"
awsr "$THIRD_REGION" events put-events --entries "$(completion_event "$THIRD_REGION" 5f0c2b1e-0000-4000-8000-00000000a002)" >/dev/null
check_eq "one put on the bus of $THIRD_REGION (not a gateway region) does not" "" "$(completion_bodies "$ACTION_URL")"
awsm sqs purge-queue --queue-url "$ACTION_URL"
check_counts "after the second create"
# Without --delay and --log-level, the functions keep their values.
check_resources 45 DEBUG
check_buckets "$ONE" "$TWO"
check_foreign_intact "after the second create"
if $STATE_CHECKS; then account_state "$ONE" "$TWO" >"$WORK/state-second-create.json"; fi
check_run "create-stack.sh a third time, with cargo lambda deploy" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "without --gateway-regions, create keeps the function's GATEWAY_REGIONS" \
  "Refresher gateway regions: $REGION,us-west-2 \\(the function's current GATEWAY_REGIONS, kept\\)"
check_log_has "without --min-refresh-interval, create keeps the function's MIN_REFRESH_INTERVAL_SECONDS" \
  "Refresher minimum refresh interval: 120s \\(the function's current MIN_REFRESH_INTERVAL_SECONDS, kept\\)"
check_log_has "the third create finds the action queue's policy up to date" "policy: up to date: .* 1 other statement\\(s\\) kept"
check_log_has "the third create finds the forwarder role's tag up to date" "tag s3ea:forwarding-regions: $OTHER_REGION, up to date"
check_log_has "the third create finds the forwarder role's policy up to date" "inline policy $FORWARDER_POLICY: up to date"
check_log_has "the third create finds the forwarding rule's target" \
  "target HomeEventBus: $HOME_BUS_ARN \\(role $FORWARDER_ROLE\\), present"
check_counts "after the third create"
check_functions 45 DEBUG
check_buckets "$ONE" "$TWO"
check_forwarding "after the third create" "$OTHER_REGION"
if $STATE_CHECKS; then
  check_state "the third create (cargo lambda deploy), after the second" "$WORK/state-second-create.json" "$ONE" "$TWO"
fi

# ---------------------------------------------------------------------------------
phase "4a. Refresh intervals below 60 s need the acknowledgement; gateway regions come and go"
# Another stack's rule of the same name in a region that this one would forward from.
COLLISION_REGION=eu-central-1
awsr "$COLLISION_REGION" events put-rule --name "$COMPLETION_RULE" --event-pattern "$(printf '%s' "$COMPLETION_PATTERN_SORTED")" >/dev/null
awsr "$COLLISION_REGION" events put-targets --rule "$COMPLETION_RULE" \
  --targets "Id=ActionQueue,Arn=arn:aws:sqs:$COLLISION_REGION:$ACCOUNT:$ACTION_QUEUE" >/dev/null
check_run "create-stack.sh --gateway-regions $REGION,$COLLISION_REGION, where another stack has the rule $COMPLETION_RULE" 1 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --gateway-regions "$REGION,$COLLISION_REGION" "$ONE" "$TWO"
check_log_has "it names the other stack's rule and what to do" \
  "the rule $COMPLETION_RULE in $COLLISION_REGION has the target\\(s\\) arn:aws:sqs:$COLLISION_REGION:$ACCOUNT:$ACTION_QUEUE, not the default event bus of $REGION: .* Nothing was changed"
if $STATE_CHECKS; then check_state "after the refused run" "$WORK/state-second-create.json" "$ONE" "$TWO"; fi
awsr "$COLLISION_REGION" events remove-targets --rule "$COMPLETION_RULE" --ids ActionQueue >/dev/null
awsr "$COLLISION_REGION" events delete-rule --name "$COMPLETION_RULE"

check_run "create-stack.sh --min-refresh-interval 30 $ONE $TWO (no acknowledgement)" 2 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --min-refresh-interval 30 "$ONE" "$TWO"
check_log_has "it says why, and names --allow-short-refresh-interval" \
  "--min-refresh-interval 30 is below 60 s, .*pass --allow-short-refresh-interval"
check_functions 45 DEBUG
check_run "create-stack.sh --min-refresh-interval 30 --allow-short-refresh-interval --gateway-regions $REGION,$THIRD_REGION (cargo lambda deploy)" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --min-refresh-interval 30 --allow-short-refresh-interval \
  --gateway-regions "$REGION,$THIRD_REGION" "$ONE" "$TWO"
check_log_has "create says that the interval is below 60 s, acknowledged" \
  "below 60 s: ALLOW_SHORT_REFRESH_INTERVAL=true \\(--allow-short-refresh-interval\\)"
check_log_has "create removes the forwarding rule of $OTHER_REGION, which left GATEWAY_REGIONS" \
  "==> EventBridge rule $COMPLETION_RULE in $OTHER_REGION \\($OTHER_REGION is no longer in GATEWAY_REGIONS\\)"
MIN_INTERVAL=30
REFRESHER_EXTRA_ENV="GATEWAY_REGIONS=$REGION,$THIRD_REGION
ALLOW_SHORT_REFRESH_INTERVAL=true"
check_functions 45 DEBUG
FORWARDING=$THIRD_REGION
check_forwarding "after the switch to $THIRD_REGION" "$THIRD_REGION"
check_eq "rule $COMPLETION_RULE in $OTHER_REGION after the switch" "" "$(forwarding_rule "$OTHER_REGION")"
check_counts "after the switch to $THIRD_REGION"

check_run "create-stack.sh again, without options (aws-cli deploy): the short interval is kept" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "create keeps the interval" "Refresher minimum refresh interval: 30s \\(the function's current MIN_REFRESH_INTERVAL_SECONDS, kept\\)"
check_log_has "create keeps the function's acknowledgement" \
  "ALLOW_SHORT_REFRESH_INTERVAL=true \\(the function's current ALLOW_SHORT_REFRESH_INTERVAL, kept\\)"
check_functions 45 DEBUG
check_forwarding "after a plain run" "$THIRD_REGION"

# By hand: the acknowledgement goes, and GATEWAY_REGIONS names the own region only;
# the forwarding rule of $THIRD_REGION is then known from the role's tag alone.
awsm lambda update-function-configuration --function-name "$REFRESHER" --environment "$(awsm lambda get-function-configuration \
  --function-name "$REFRESHER" --query Environment --output json | python3 -c '
import json, sys
env = json.load(sys.stdin)
del env["Variables"]["ALLOW_SHORT_REFRESH_INTERVAL"]
env["Variables"]["GATEWAY_REGIONS"] = sys.argv[1]
print(json.dumps(env))
' "$REGION")" >/dev/null
before_env=$(env_of "$REFRESHER")
check_run "create-stack.sh with a short interval on the function but no acknowledgement" 1 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "it says what to pass" \
  "the refresher's current MIN_REFRESH_INTERVAL_SECONDS is 30, below 60 s, and it has no ALLOW_SHORT_REFRESH_INTERVAL=true: pass --allow-short-refresh-interval to keep it, or --min-refresh-interval 60 or more. Nothing was changed"
check_eq "the refresher's variables after the refused run" "$before_env" "$(env_of "$REFRESHER")"
check_forwarding "after the refused run" "$THIRD_REGION"
check_run "ALLOW_SHORT_REFRESH_INTERVAL=true create-stack.sh (aws-cli deploy)" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli ALLOW_SHORT_REFRESH_INTERVAL=true scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "create takes the acknowledgement from the variable" \
  "below 60 s: ALLOW_SHORT_REFRESH_INTERVAL=true \\(ALLOW_SHORT_REFRESH_INTERVAL=true\\)"
check_log_has "create finds no gateway region but its own" \
  "Completion events from the other gateway regions: none \\(GATEWAY_REGIONS names no region but $REGION\\)"
check_log_has "create removes the rule of $THIRD_REGION, found from the role's tag" \
  "==> EventBridge rule $COMPLETION_RULE in $THIRD_REGION \\($THIRD_REGION is no longer in GATEWAY_REGIONS\\)"
check_log_has "create deletes the role $FORWARDER_ROLE" "deleting inline policy $FORWARDER_POLICY"
REFRESHER_EXTRA_ENV="GATEWAY_REGIONS=$REGION
ALLOW_SHORT_REFRESH_INTERVAL=true"
check_functions 45 DEBUG
FORWARDING=
check_no_forwarding "with GATEWAY_REGIONS=$REGION" "$OTHER_REGION" "$THIRD_REGION"
check_counts "with GATEWAY_REGIONS=$REGION"

check_run "create-stack.sh --min-refresh-interval 120 --gateway-regions $REGION,$OTHER_REGION (cargo lambda deploy)" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --min-refresh-interval 120 --gateway-regions "$REGION,$OTHER_REGION" "$ONE" "$TWO"
check_log_has "create says that the acknowledgement goes" "60 s or more: the function's ALLOW_SHORT_REFRESH_INTERVAL goes"
check_log_has "cargo lambda deploy keeps the variables it is not given: create removes it after the deploy" \
  "correcting what cargo lambda deploy left: ALLOW_SHORT_REFRESH_INTERVAL \\(not set by this run\\)"
MIN_INTERVAL=120
REFRESHER_EXTRA_ENV="GATEWAY_REGIONS=$REGION,$OTHER_REGION"
check_functions 45 DEBUG
FORWARDING=$OTHER_REGION
check_forwarding "back to $OTHER_REGION" "$OTHER_REGION"
check_no_forwarding_rule_in() { check_eq "rule $COMPLETION_RULE in $1 ($2)" "" "$(forwarding_rule "$1")"; }
check_no_forwarding_rule_in "$THIRD_REGION" "back to $OTHER_REGION"
check_counts "back to $OTHER_REGION"
if $STATE_CHECKS; then
  check_state "back to the settings of the second create: the same state" "$WORK/state-second-create.json" "$ONE" "$TWO"
fi

# ---------------------------------------------------------------------------------
phase "4b. CloudWatch: the dashboard on every run, the alarms with --alarm-topic"
# Readers of the stack's alarms and dashboard (scripts/lib/monitoring.sh).
# alarms: the alarms <prefix>-*, one line each, sorted:
# name|namespace|metric|dimensions|statistic|period|evaluations|datapoints|threshold|
# comparison|missing data|alarm actions|OK actions.
alarms() {
  awsm cloudwatch describe-alarms --alarm-name-prefix "$PREFIX-" --output json | python3 -c '
import json, sys
for a in json.load(sys.stdin)["MetricAlarms"]:
    dims = ",".join("%s=%s" % (d["Name"], d["Value"]) for d in a.get("Dimensions", []))
    print("|".join(str(x) for x in [a["AlarmName"], a["Namespace"], a["MetricName"], dims,
        a["Statistic"], a["Period"], a["EvaluationPeriods"], a.get("DatapointsToAlarm"),
        int(a["Threshold"]), a["ComparisonOperator"], a.get("TreatMissingData"),
        ",".join(a["AlarmActions"]), ",".join(a["OKActions"])]))
' | sort
}
# expected_alarms TOPIC OLDEST_EVENT_MS STALENESS_MS WITH_INGEST_DLQ: the alarms of
# docs/operating.md. The metrics of the EMF lines are alarmed on with the dimension set
# {Function} alone: the function's totals line (shared/src/metrics.rs), whose value is
# the Lambda function's name (AWS_LAMBDA_FUNCTION_NAME), so two stacks do not mix; the
# DLQs on SQS's QueueName.
expected_alarms() {
  local ns=S3EventAggregator tail="GreaterThanThreshold|notBreaching|$1|$1" a="Function=$AGGREGATOR" r="Function=$REFRESHER"
  local sqs="AWS/SQS|ApproximateNumberOfMessagesVisible|QueueName"
  {
    echo "$PREFIX-AggregatorDlqNotEmpty|$sqs=$AGGREGATOR_DLQ|Maximum|300|1|1|0|$tail"
    echo "$PREFIX-ActionDlqNotEmpty|$sqs=$ACTION_DLQ|Maximum|300|1|1|0|$tail"
    if [ "$4" = true ]; then echo "$PREFIX-IngestDlqNotEmpty|$sqs=$INGEST_DLQ|Maximum|300|1|1|0|$tail"; fi
    echo "$PREFIX-RefreshesThrottled|$ns|RefreshesThrottled|$r|Sum|900|1|1|10|$tail"
    echo "$PREFIX-MessagesFailed|$ns|MessagesFailed|$r|Sum|300|3|3|0|$tail"
    echo "$PREFIX-OldestEventTooOld|$ns|OldestEventAgeMs|$r|Maximum|300|1|1|$2|$tail"
    echo "$PREFIX-StalenessTooHigh|$ns|StalenessMs|$r|Maximum|300|1|1|$3|$tail"
    echo "$PREFIX-S3DeliveryLate|$ns|OldestEventAgeMs|$a|Maximum|300|1|1|300000|$tail"
    echo "$PREFIX-EventsSkippedMalformed|$ns|EventsSkippedMalformed|$a|Sum|3600|1|1|0|$tail"
    echo "$PREFIX-AccessPointsUnresolved|$ns|AccessPointsUnresolved|$r|Sum|3600|1|1|0|$tail"
    echo "$PREFIX-MessagesUnreadable|$ns|MessagesUnreadable|$r|Sum|300|1|1|0|$tail"
  } | sort
}
alarm_description() { # NAME
  awsm cloudwatch describe-alarms --alarm-names "$PREFIX-$1" --query 'MetricAlarms[0].AlarmDescription' --output text
}
alarm_count() { awsm cloudwatch describe-alarms --alarm-name-prefix "$PREFIX-" --query 'length(MetricAlarms)' --output text; }
alarm_timestamps() { awsm cloudwatch describe-alarms --alarm-name-prefix "$PREFIX-" --query 'MetricAlarms[].[AlarmName, AlarmConfigurationUpdatedTimestamp]' --output text | sort; }
dashboard_count() {
  awsm cloudwatch list-dashboards --dashboard-name-prefix "$PREFIX" \
    --query "length(DashboardEntries[?DashboardName == '$PREFIX'])" --output text
}
# dashboard: the dashboard <prefix>'s widgets, one line each: "text", or
# "title|statistic|metric ..." with each metric as namespace/name/dimension/value...[/stat]
# or search:namespace/name/function/statistic for a SEARCH over the Bucket dimension, and
# "|annotations:VALUE,..." for the horizontal annotations. The body must be JSON, and the
# widgets must not overlap.
dashboard() {
  awsm cloudwatch get-dashboard --dashboard-name "$PREFIX" --query DashboardBody --output text | python3 -c '
import json, re, sys
widgets = json.load(sys.stdin)["widgets"]
cells = set()
for w in widgets:
    for x in range(w["x"], w["x"] + w["width"]):
        for y in range(w["y"], w["y"] + w["height"]):
            assert (x, y) not in cells and x < 24, "widgets overlap at %d,%d" % (x, y)
            cells.add((x, y))
    p = w["properties"]
    if w["type"] != "metric":
        print(w["type"])
        continue
    sig = []
    for m in p["metrics"]:
        if "expression" in m[0]:
            g = re.fullmatch(r"SEARCH\(\x27\{(\w+),Function,Bucket\} MetricName=\"(\w+)\" Function=\"(\w+)\"\x27, \x27(\w+)\x27, 300\)", m[0]["expression"])
            sig.append("search:%s/%s/%s/%s" % g.groups() if g else "unexpected:" + m[0]["expression"])
        else:
            opts = m[-1] if isinstance(m[-1], dict) else {}
            sig.append("/".join(x for x in m if isinstance(x, str)) + ("/" + opts["stat"] if "stat" in opts else ""))
    lines = ",".join(str(a["value"]) for a in p.get("annotations", {}).get("horizontal", []))
    print("%s|%s|%s%s" % (p["title"], p["stat"], " ".join(sig), "|annotations:" + lines if lines else ""))
'
}
# expected_dashboard WITH_INGEST_DLQ W I BUCKET...: the overview (every bucket, through
# SEARCH), the DLQ depths, the staleness of every bucket with lines at the bound and at
# the alarm's threshold (for the window W and the interval I), then one row of three
# widgets per bucket, in name order. The Function dimension is the function's name.
expected_dashboard() {
  local ns=S3EventAggregator dlq=AWS/SQS/ApproximateNumberOfMessagesVisible/QueueName b a=$AGGREGATOR r=$REFRESHER
  local dlqs="$dlq/$AGGREGATOR_DLQ $dlq/$ACTION_DLQ" w=$2 i=$3
  if [ "$1" = true ]; then dlqs="$dlqs $dlq/$INGEST_DLQ"; fi
  shift 3
  echo text
  echo "Events in, per bucket|Sum|search:$ns/EventsReceived/$a/Sum"
  echo "Windows opened, per bucket|Sum|search:$ns/WindowsOpened/$a/Sum"
  echo "Window writes (DynamoDB), per bucket|Sum|search:$ns/WindowWrites/$a/Sum"
  echo "Refreshes requested, per bucket|Sum|search:$ns/RefreshesRequested/$r/Sum"
  echo "Failures: messages failed, refreshes throttled, per bucket|Sum|search:$ns/MessagesFailed/$r/Sum search:$ns/RefreshesThrottled/$r/Sum"
  echo "DLQ depths (messages visible)|Maximum|$dlqs"
  echo "Staleness, per bucket (ms): at completion (max, p95) and at the call (oldest event age)|Maximum|search:$ns/StalenessMs/$r/Maximum search:$ns/StalenessMs/$r/p95 search:$ns/OldestEventAgeMs/$r/Maximum|annotations:$(bound_ms "$w" "$i"),$(staleness_ms "$w" "$i")"
  for b in $(printf '%s\n' "$@" | sort); do
    echo "$b: events in, windows opened, window writes|Sum|$ns/EventsReceived/Function/$a/Bucket/$b $ns/WindowsOpened/Function/$a/Bucket/$b $ns/WindowWrites/Function/$a/Bucket/$b"
    echo "$b: refreshes requested, oldest event age|Sum|$ns/RefreshesRequested/Function/$r/Bucket/$b $ns/OldestEventAgeMs/Function/$r/Bucket/$b/Maximum"
    echo "$b: failures|Sum|$ns/MessagesFailed/Function/$r/Bucket/$b $ns/RefreshesThrottled/Function/$r/Bucket/$b"
  done
}

# The runs so far had no --alarm-topic: a dashboard, and no alarm.
check_log_has "create without --alarm-topic creates no alarm" "CloudWatch alarms: none \\(pass --alarm-topic ARN"
check_eq "alarms $PREFIX-* before --alarm-topic" 0 "$(alarm_count)"
check_eq "dashboard $PREFIX: widgets for $ONE and $TWO" "$(expected_dashboard false 45 120 "$ONE" "$TWO")" "$(dashboard)"

TOPIC_A=$(awsm sns create-topic --name "s3ea-test-ops-a$BUCKET_SUFFIX" --query TopicArn --output text)
TOPIC_B=$(awsm sns create-topic --name "s3ea-test-ops-b$BUCKET_SUFFIX" --query TopicArn --output text)
check_run "create-stack.sh --alarm-topic for a topic that does not exist" 1 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --alarm-topic "arn:aws:sns:$REGION:$ACCOUNT:s3ea-test-missing$BUCKET_SUFFIX" "$ONE" "$TWO"
check_log_has "it says that the topic does not exist" "SNS topic arn:aws:sns:$REGION:$ACCOUNT:s3ea-test-missing$BUCKET_SUFFIX does not exist"
check_eq "alarms after the refused run" 0 "$(alarm_count)"

check_run "create-stack.sh --alarm-topic $TOPIC_A $ONE $TWO" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" --alarm-topic "$TOPIC_A" "$ONE" "$TWO"
check_log_has "create prints the alarms it puts" "$PREFIX-ActionDlqNotEmpty: ApproximateNumberOfMessagesVisible"
# REFRESH_DELAY_SECONDS is 45 (phase 2): OldestEventTooOld 2 x 45 x 1000 + 60000;
# MIN_REFRESH_INTERVAL_SECONDS is 120 (phase 4): StalenessTooHigh 1000 x (45 + 1 + 60 +
# 5 x (120 + 1 + 60) + 600).
STALENESS_MS=$(staleness_ms 45 120)
check_eq "the StalenessTooHigh threshold for W=45, I=120" 1611000 "$STALENESS_MS"
check_eq "alarms after --alarm-topic: metric, namespace, dimensions (the functions' names), threshold, actions" \
  "$(expected_alarms "$TOPIC_A" 150000 "$STALENESS_MS" false)" "$(alarms)"
check_log_has "create prints the staleness bound" \
  "staleness bound: $(($(bound_ms 45 120) / 1000)) s for REFRESH_DELAY_SECONDS=45 and MIN_REFRESH_INTERVAL_SECONDS=120"
check_eq "alarm StalenessTooHigh: its description says the threshold in words" \
  "A refresh completed more than 1611 s after the oldest event it covers. The threshold is the staleness bound plus the listing: 45 s of window (REFRESH_DELAY_SECONDS) + 1 s of clock margin + 1 x 60 s of SQS delivery for the window's message + 5 x (120 + 1 + 60) s for a backlog of 5 calls, one per MIN_REFRESH_INTERVAL_SECONDS=120 plus a 1-s clock margin, each brought by a wake-up = 1011 s (the staleness bound of docs/protocol.md), plus 600 s for the listing itself. A share showed changes late. See docs/operating.md." \
  "$(alarm_description StalenessTooHigh)"
check_eq "dashboard $PREFIX after --alarm-topic" "$(expected_dashboard false 45 120 "$ONE" "$TWO")" "$(dashboard)"
before=$(alarm_timestamps)
sleep 1 # so that a put would change AlarmConfigurationUpdatedTimestamp
check_run "create-stack.sh again without --alarm-topic" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "a run without --alarm-topic says that it keeps the alarms" "CloudWatch alarms: 10 kept as they are"
check_eq "alarms kept as they were (same configuration time)" "$before" "$(alarm_timestamps)"
check_eq "alarms after a run without --alarm-topic" "$(expected_alarms "$TOPIC_A" 150000 "$STALENESS_MS" false)" "$(alarms)"
check_run "create-stack.sh --alarm-topic=$TOPIC_B (another topic)" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" --alarm-topic="$TOPIC_B" "$ONE" "$TWO"
check_eq "alarms updated to the new topic" "$(expected_alarms "$TOPIC_B" 150000 "$STALENESS_MS" false)" "$(alarms)"
check_eq "alarms $PREFIX-* after three runs: none duplicated" 10 "$(alarm_count)"
check_eq "dashboards named $PREFIX" 1 "$(dashboard_count)"

# ---------------------------------------------------------------------------------
phase "5. attach-bucket.sh $THREE"
check_run "attach-bucket.sh $THREE" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$THREE"
check_run "attach-bucket.sh $THREE again" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$THREE"
check_buckets "$ONE" "$THREE" "$TWO"
check_foreign_intact "after attach"

# ---------------------------------------------------------------------------------
phase "5b. Entries of an older deployment (without s3:LifecycleExpiration:*) are updated"
put_old_entry "$ONE"
put_old_entry "$THREE"
for bucket in "$ONE" "$THREE"; do
  check_eq "old entry on $bucket" "$NOTIFICATION_ID|$AGGREGATOR_ARN|$OLD_EVENTS" "$(our_entries "$bucket")"
done
check_foreign_intact "with the old entry"
check_run "create-stack.sh $ONE $TWO again" 0 scripts/create-stack.sh "${PREFIX_OPT[@]}" "$ONE" "$TWO"
check_log_has "create says that it updates the entry's events" "$(update_line)"
check_eq "entries updated by create (only $ONE's was old)" 1 "$(grep -Ec -- "$(update_line)" "$LAST_LOG" || true)"
check_eq "entry on $ONE after create" "$NOTIFICATION_ID|$AGGREGATOR_ARN|$OUR_EVENTS" "$(our_entries "$ONE")"
check_eq "entry on $THREE after create (not named: left as it was)" \
  "$NOTIFICATION_ID|$AGGREGATOR_ARN|$OLD_EVENTS" "$(our_entries "$THREE")"
check_foreign_intact "after create updated the old entry"
check_run "attach-bucket.sh $THREE again" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$THREE"
check_log_has "attach says that it updates the entry's events" "$(update_line)"
check_run "attach-bucket.sh $THREE once more" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$THREE"
check_eq "nothing left to update on the next run" 0 "$(grep -Ec -- "$(update_line)" "$LAST_LOG" || true)"
check_buckets "$ONE" "$THREE" "$TWO"
check_foreign_intact "after attach updated the old entry"

# ---------------------------------------------------------------------------------
phase "5c. --log-format json|text: the functions' LoggingConfig"
# moto 5 accepts LoggingConfig but does not store it (get-function-configuration shows
# none), so what is checked is what create-stack.sh sends, read back from moto's
# recorder, and what it prints. On AWS a second json run finds it up to date.
recorder() { # reset-recording | start-recording | stop-recording
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/moto-api/recorder/" + sys.argv[2], method="POST"), timeout=10).read()' \
    "$MOTO_ENDPOINT" "$1"
}
# recorded_logging_configs: "FUNCTION LoggingConfig" for each recorded
# UpdateFunctionConfiguration that carried one, sorted.
recorded_logging_configs() {
  python3 - "$MOTO_ENDPOINT" <<'PY' | sort
import base64, json, sys, urllib.request
data = urllib.request.urlopen(sys.argv[1] + "/moto-api/recorder/download-recording", timeout=120).read()
for line in data.decode().splitlines():
    entry = json.loads(line)
    if entry["method"] != "PUT" or not entry["url"].endswith("/configuration"):
        continue
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode()
    config = json.loads(body or "{}").get("LoggingConfig")
    if config is not None:
        keys = ("LogFormat", "ApplicationLogLevel", "SystemLogLevel")
        print(entry["url"].rsplit("/", 2)[-2], ",".join(f"{k}={config[k]}" for k in keys if k in config))
PY
}
# logging_run WHAT ARGS...: create-stack.sh ARGS $ONE $TWO, recorded.
logging_run() {
  local what=$1
  shift
  recorder reset-recording
  recorder start-recording
  check_run "$what" 0 scripts/create-stack.sh "${PREFIX_OPT[@]}" "$@" "$ONE" "$TWO"
  recorder stop-recording
}
logging_run "create-stack.sh --log-format json" --log-format json
check_eq "--log-format json sets both functions' LoggingConfig (LOG_LEVEL is DEBUG)" \
  "$AGGREGATOR LogFormat=JSON,ApplicationLogLevel=DEBUG,SystemLogLevel=WARN|$REFRESHER LogFormat=JSON,ApplicationLogLevel=DEBUG,SystemLogLevel=WARN" \
  "$(recorded_logging_configs | paste -sd '|' -)"
check_log_has "create says what --log-format json does" \
  "Logging configuration of $AGGREGATOR: LogFormat=JSON,ApplicationLogLevel=DEBUG,SystemLogLevel=WARN \\(--log-format json; .*no START, END and REPORT lines\\)"
logging_run "create-stack.sh --log-format JSON --log-level warn" --log-format JSON --log-level warn
check_eq "the application level stays at INFO under LOG_LEVEL=WARN (EMF lines are INFO to Lambda)" \
  "$AGGREGATOR LogFormat=JSON,ApplicationLogLevel=INFO,SystemLogLevel=WARN|$REFRESHER LogFormat=JSON,ApplicationLogLevel=INFO,SystemLogLevel=WARN" \
  "$(recorded_logging_configs | paste -sd '|' -)"
logging_run "create-stack.sh --log-format text --log-level debug" --log-format text --log-level debug
check_eq "--log-format text sets LogFormat=Text only" \
  "$AGGREGATOR LogFormat=Text|$REFRESHER LogFormat=Text" "$(recorded_logging_configs | paste -sd '|' -)"
logging_run "create-stack.sh without --log-format" --log-level debug
check_eq "without --log-format (moto: no stored format, so Text) nothing is sent" "" "$(recorded_logging_configs)"
check_log_has "create says it keeps the format" "Logging configuration of $REFRESHER: LogFormat=Text \\(kept;"
check_functions 45 DEBUG

check_eq "dashboard $PREFIX after attach-bucket.sh $THREE and create-stack.sh: a row for $THREE" \
  "$(expected_dashboard false 45 120 "$ONE" "$TWO" "$THREE")" "$(dashboard)"
check_eq "alarms before delete" "$(expected_alarms "$TOPIC_B" 150000 "$STALENESS_MS" false)" "$(alarms)"

# ---------------------------------------------------------------------------------
phase "6. detach-bucket.sh $ONE (the bucket with the foreign entries)"
check_run "detach-bucket.sh $ONE" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$ONE"
check_eq "our entry on $ONE after detach" "" "$(our_entries "$ONE")"
check_foreign_intact "after detach"
check_run "detach-bucket.sh $ONE again" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$ONE"
check_log_has "second detach finds nothing to remove" "notification $NOTIFICATION_ID: absent"
check_buckets "$THREE" "$TWO"

# ---------------------------------------------------------------------------------
phase "7. delete-stack.sh (finds $TWO and $THREE from the permissions)"
check_run "delete-stack.sh" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}"
check_log_has "delete found $TWO" "==> Bucket $TWO"
check_log_has "delete found $THREE" "==> Bucket $THREE"
check_log_has "delete removes the completion rule's target" "removing its targets: ActionQueue"
check_log_has "delete finds the forwarding regions" \
  "==> Forwarding rules $COMPLETION_RULE in the other gateway regions: $OTHER_REGION \\(from the refresher's GATEWAY_REGIONS $REGION,$OTHER_REGION"
check_log_has "delete removes the forwarding rule's target" "removing its target HomeEventBus \\($HOME_BUS_ARN\\)"
check_log_has "delete removes the forwarding rule" "==> EventBridge rule $COMPLETION_RULE in $OTHER_REGION \\(forwards to the default event bus of $REGION\\)"

# ---------------------------------------------------------------------------------
phase "8. Nothing of ours remains; the foreign entries survive"
for what in roles policies queues functions loggroups tables mappings rules; do
  check_eq "$what of the stack after delete" 0 "$(count_prefixed "$what")"
done
check_eq "event source mappings of $REFRESHER after delete" 0 \
  "$(awsm lambda list-event-source-mappings --query "length(EventSourceMappings[?ends_with(FunctionArn, ':function:$REFRESHER')])" --output text)"
for bucket in "$ONE" "$TWO" "$THREE"; do
  check_eq "our entry on $bucket after delete" "" "$(our_entries "$bucket")"
  check_eq "bucket $bucket still exists" 0 "$(awsm s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; echo $?)"
done
check_foreign_intact "after delete"
check_no_forwarding "after delete" "$OTHER_REGION" "$THIRD_REGION"
check_eq "alarms $PREFIX-* after delete" 0 "$(alarm_count)"
check_eq "dashboard $PREFIX after delete" 0 "$(dashboard_count)"
check_eq "alarm topic $TOPIC_B kept (not ours)" "$TOPIC_B" \
  "$(awsm sns get-topic-attributes --topic-arn "$TOPIC_B" --query Attributes.TopicArn --output text)"
check_eq "foreign queue still exists" "$FOREIGN_QUEUE_URL" \
  "$(awsm sqs get-queue-url --queue-name "foreign-events$BUCKET_SUFFIX" --query QueueUrl --output text)"

# ---------------------------------------------------------------------------------
phase "9. delete-stack.sh again"
check_run "delete-stack.sh a second time" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}" "$ONE"
check_log_has "second delete finds the function absent" "==> Lambda function $AGGREGATOR"
check_log_has "second delete finds the completion rule absent" "==> EventBridge rule $COMPLETION_RULE"
check_log_has "second delete finds no forwarding rule" "==> Forwarding rules $COMPLETION_RULE in the other gateway regions: none"
check_log_has "second delete finds the forwarder role absent" "==> IAM role $FORWARDER_ROLE"
check_log_has "second delete finds no alarm" "no alarm named $PREFIX-<Name>"
check_log_has "second delete finds the dashboard absent" "dashboard $PREFIX: absent"
check_foreign_intact "after the second delete"

# ---------------------------------------------------------------------------------
# --ingest sqs and --ingest eventbridge: one stack each, with its own prefix and its
# own buckets, after the direct stack is gone.

# Readers for these modes.
function_tag() { # TAG
  awsm lambda list-tags --resource "$AGGREGATOR_ARN" --query "Tags.\"$1\"" --output text
}
attached_policies() { # ROLE: the names of its managed policies, sorted, space-separated
  awsm iam list-attached-role-policies --role-name "$1" --query 'AttachedPolicies[].PolicyName' --output text |
    tr '\t' '\n' | sort | tr '\n' ' ' | sed 's/ $//'
}
# A queue's policy as "Principal|Action|Resource|SourceAccount|SourceArns" lines, one per
# statement ("none" when the queue has no policy).
queue_policy() { # QUEUE
  local policy
  policy=$(queue_attribute "$1" Policy)
  if [ "$policy" = None ] || [ -z "$policy" ]; then
    echo none
    return
  fi
  printf '%s' "$policy" | python3 -c '
import json, sys
for s in json.load(sys.stdin)["Statement"]:
    c = s.get("Condition", {})
    arns = []
    for op in ("ArnLike", "ArnEquals"):
        v = c.get(op, {}).get("aws:SourceArn", [])
        arns += v if isinstance(v, list) else [v]
    print("|".join([s["Principal"]["Service"], s["Action"], s["Resource"],
        c.get("StringEquals", {}).get("aws:SourceAccount", ""), ",".join(sorted(arns))]))
'
}
# The mapping from the ingest queue: "FunctionArn|BatchSize|Window|ResponseTypes|State".
ingest_mapping() {
  awsm lambda list-event-source-mappings --event-source-arn "$SQS_ARN:$INGEST_QUEUE" --output text \
    --query "EventSourceMappings[].[FunctionArn, BatchSize, MaximumBatchingWindowInSeconds, join(',', FunctionResponseTypes), State]" |
    tr '\t' '|'
}
# The rule: "State|source|detail-type|bucket names (sorted)".
rule_summary() {
  awsm events describe-rule --name "$EVENT_RULE" --query '[State, EventPattern]' --output json | python3 -c '
import json, sys
state, pattern = json.load(sys.stdin)
p = json.loads(pattern)
print("|".join([state, ",".join(p["source"]), ",".join(p["detail-type"]), ",".join(sorted(p["detail"]["bucket"]["name"]))]))
'
}
rule_targets() { # "Id|Arn|DLQ|MaximumRetryAttempts|MaximumEventAgeInSeconds" per target
  awsm events list-targets-by-rule --rule "$EVENT_RULE" --output text \
    --query 'Targets[].[Id, Arn, DeadLetterConfig.Arn, RetryPolicy.MaximumRetryAttempts, RetryPolicy.MaximumEventAgeInSeconds]' |
    tr '\t' '|'
}
rule_tag_keys() {
  awsm events list-tags-for-resource --resource-arn "$EVENT_RULE_ARN" --query 'Tags[].Key' --output text |
    tr '\t' '\n' | sort | tr '\n' ' ' | sed 's/ $//'
}
arns_of() { # BUCKET...: their ARNs, sorted, comma-separated
  printf 'arn:aws:s3:::%s\n' "$@" | sort | tr '\n' ',' | sed 's/,$//'
}
names_of() { # BUCKET...: sorted, comma-separated
  printf '%s\n' "$@" | sort | tr '\n' ',' | sed 's/,$//'
}
: >"$WORK/empty"
put_object() { awsm s3api put-object --bucket "$1" --key "$2" --body "$WORK/empty" >/dev/null; }
# Another team's notification entries (event types that do not overlap ours).
put_foreign_config() { # BUCKET
  awsm s3api put-bucket-notification-configuration --bucket "$1" --notification-configuration "{
    \"QueueConfigurations\": [{\"Id\": \"foreign-queue\", \"QueueArn\": \"$FOREIGN_QUEUE_ARN\",
      \"Events\": [\"s3:ObjectRestore:Completed\"],
      \"Filter\": {\"Key\": {\"FilterRules\": [{\"Name\": \"prefix\", \"Value\": \"archive/\"}]}}}],
    \"LambdaFunctionConfigurations\": [{\"Id\": \"foreign-lambda\",
      \"LambdaFunctionArn\": \"arn:aws:lambda:$REGION:$ACCOUNT:function:SomeoneElsesFunction\",
      \"Events\": [\"s3:ObjectTagging:*\"]}]}"
}
# Nothing of the stack is left (prefix PREFIX).
check_all_gone() { # WHEN
  for what in roles policies queues functions loggroups tables mappings ingestmappings rules; do
    check_eq "$what of the stack $PREFIX $1" 0 "$(count_prefixed "$what")"
  done
  check_eq "event source mappings of $AGGREGATOR and $REFRESHER $1" 0 \
    "$(awsm lambda list-event-source-mappings --query "length(EventSourceMappings[?ends_with(FunctionArn, ':function:$AGGREGATOR') || ends_with(FunctionArn, ':function:$REFRESHER')])" --output text)"
}

if [ -n "$BUCKET_SUFFIX" ]; then PREFIX_BASE=S3EATest${BUCKET_SUFFIX#-}; else PREFIX_BASE=S3EATest; fi

# ---------------------------------------------------------------------------------
phase "10. --ingest sqs"
use_prefix "${PREFIX_BASE}Sqs"
OTHER_STATEMENTS= # a new action queue
PREFIX_OPT=(--prefix "$PREFIX")
SA=s3ea-test-sqs-a$BUCKET_SUFFIX
SB=s3ea-test-sqs-b$BUCKET_SUFFIX
SC=s3ea-test-sqs-c$BUCKET_SUFFIX
for bucket in "$SA" "$SB" "$SC"; do
  awsm s3api create-bucket --bucket "$bucket" --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
done
put_foreign_config "$SA"
FOREIGN_SA=$(foreign_entries "$SA")
INGEST_ENTRY=$OUR_EVENTS

# A window longer than SQS's 900-s delay, and no interval at all (acknowledged).
check_run "create-stack.sh --ingest sqs --alarm-topic $TOPIC_A --delay 1000 --min-refresh-interval 0 --allow-short-refresh-interval $SA $SB" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --ingest sqs --alarm-topic "$TOPIC_A" --delay 1000 \
  --min-refresh-interval 0 --allow-short-refresh-interval "$SA" "$SB"
check_eq "function $REFRESHER environment: MIN_REFRESH_INTERVAL_SECONDS=0 with the acknowledgement" \
  "ALLOW_SHORT_REFRESH_INTERVAL=true LOG_LEVEL=INFO MIN_REFRESH_INTERVAL_SECONDS=0 TABLE_NAME=$TABLE" "$(env_of "$REFRESHER")"
# The crates' metadata says TABLE_NAME = "S3EventAggregator", which cargo lambda deploy
# puts before an --env-file: a stack with another prefix must still get its own table,
# at once.
check_eq "function $AGGREGATOR TABLE_NAME (cargo lambda deploy, prefix $PREFIX)" "TABLE_NAME=$TABLE" \
  "$(env_of "$AGGREGATOR" | tr ' ' '\n' | grep '^TABLE_NAME=')"
check_eq "no variable needed correcting after cargo lambda deploy" 0 "$(grep -c 'correcting what cargo lambda deploy left' "$LAST_LOG" || true)"
# REFRESH_DELAY_SECONDS is 1000: OldestEventTooOld 2 x 1000 x 1000 + 60000;
# StalenessTooHigh 1000 x (1000 + 1 + 60 x ceil(1000 / 900) + 5 x 60 + 600), with no
# pacing in the backlog's calls for MIN_REFRESH_INTERVAL_SECONDS=0.
check_eq "the StalenessTooHigh threshold for W=1000, I=0" 2021000 "$(staleness_ms 1000 0)"
check_eq "alarms of the sqs stack: with the ingest DLQ's" "$(expected_alarms "$TOPIC_A" 2060000 "$(staleness_ms 1000 0)" true)" "$(alarms)"
check_eq "alarm StalenessTooHigh of the sqs stack: its description names the extra hop and no pacing" \
  "2 x 60 s of SQS delivery for the window's message + 5 x 60 s for a backlog of 5 calls, each brought by a wake-up (MIN_REFRESH_INTERVAL_SECONDS=0) = 1421 s" \
  "$(alarm_description StalenessTooHigh | grep -o '[0-9]* x 60 s of SQS delivery.*= [0-9]* s')"
check_eq "dashboard $PREFIX of the sqs stack: with the ingest DLQ's depth" \
  "$(expected_dashboard true 1000 0 "$SA" "$SB")" "$(dashboard)"
check_log_has "create says the mode and where it comes from" "==> Ingest: sqs \\(--ingest\\)"
check_log_has "create prints the ingest queue" "ingest queue +$SQS_ARN:$INGEST_QUEUE"

check_sqs_stack() { # BUCKET...: the attached buckets
  local timeout
  timeout=$(function_field "$AGGREGATOR" Timeout)
  check_ge "queue $INGEST_QUEUE visibility timeout vs 6 x aggregator timeout ($timeout s)" \
    $((6 * timeout)) "$(queue_attribute "$INGEST_QUEUE" VisibilityTimeout)"
  check_eq "queue $INGEST_QUEUE redrive policy" "$SQS_ARN:$INGEST_DLQ maxReceiveCount=5" \
    "$(queue_attribute "$INGEST_QUEUE" RedrivePolicy | python3 -c 'import json, sys; p = json.load(sys.stdin); print(p["deadLetterTargetArn"], "maxReceiveCount=%s" % p["maxReceiveCount"])')"
  for queue in "$INGEST_QUEUE" "$INGEST_DLQ"; do
    check_eq "queue $queue SSE (SqsManagedSseEnabled)" true "$(queue_attribute "$queue" SqsManagedSseEnabled)"
  done
  check_eq "queue $INGEST_DLQ retention" 1209600 "$(queue_attribute "$INGEST_DLQ" MessageRetentionPeriod)"
  check_eq "queue $INGEST_QUEUE policy: S3 of this account may send the attached buckets' events" \
    "s3.amazonaws.com|sqs:SendMessage|$SQS_ARN:$INGEST_QUEUE|$ACCOUNT|$(arns_of "$@")" "$(queue_policy "$INGEST_QUEUE")"
  check_eq "event source mapping $INGEST_QUEUE -> $AGGREGATOR: function, batch, window, response types, state" \
    "$AGGREGATOR_ARN|10000|5|ReportBatchItemFailures|Enabled" "$(ingest_mapping)"
  check_eq "role $AGGREGATOR_ROLE attached policies" \
    "$(printf '%s\n' "$AGGREGATOR_POLICY" "$INGEST_POLICY" | sort | tr '\n' ' ' | sed 's/ $//')" "$(attached_policies "$AGGREGATOR_ROLE")"
  check_eq "policy $INGEST_POLICY document = iam/aggregator-ingest-policy.json rendered" \
    "$(expected_policy aggregator-ingest-policy.json "$AGGREGATOR")" "$(deployed_policy "$INGEST_POLICY")"
  check_eq "policy $AGGREGATOR_POLICY document = iam/aggregator-policy.json rendered" \
    "$(expected_policy aggregator-policy.json "$AGGREGATOR")" "$(deployed_policy "$AGGREGATOR_POLICY")"
  check_eq "function $AGGREGATOR tag s3ea:ingest" sqs "$(function_tag s3ea:ingest)"
  check_eq "permission statements on $AGGREGATOR (none with --ingest sqs)" 0 "$(count_lines "$(permissions)")"
  for bucket in "$@"; do
    check_eq "notification entry on $bucket: a queue entry to $INGEST_QUEUE, and no other of ours" \
      "$NOTIFICATION_ID|$SQS_ARN:$INGEST_QUEUE|$INGEST_ENTRY" "$(our_entries "$bucket")"
  done
  check_eq "queues with prefix $PREFIX" 5 "$(count_prefixed queues)"
  check_eq "event source mappings on $INGEST_QUEUE" 1 "$(count_prefixed ingestmappings)"
  check_eq "event source mappings on $ACTION_QUEUE" 1 "$(count_prefixed mappings)"
  check_eq "customer managed policies with prefix $PREFIX" 3 "$(count_prefixed policies)"
  for policy in "$AGGREGATOR_POLICY" "$INGEST_POLICY" "$REFRESHER_POLICY"; do
    check_eq "versions of policy $policy" 1 \
      "$(awsm iam list-policy-versions --policy-arn "arn:aws:iam::$ACCOUNT:policy/$policy" --query 'length(Versions)' --output text)"
  done
  check_eq "rules with prefix $PREFIX (the completion rule only with --ingest sqs)" 1 "$(count_prefixed rules)"
  check_completion "the sqs stack"
  check_eq "foreign entries on $SA unchanged" "$FOREIGN_SA" "$(foreign_entries "$SA")"
}
check_sqs_stack "$SA" "$SB"

# moto delivers S3's events to the queue (the mapping's attempt to run the function,
# which moto cannot do, leaves the message in the queue).
INGEST_URL=$(awsm sqs get-queue-url --queue-name "$INGEST_QUEUE" --query QueueUrl --output text)
awsm sqs purge-queue --queue-url "$INGEST_URL"
put_object "$SB" "new-object.txt"
check_eq "an object put in $SB reaches $INGEST_QUEUE as an S3 event" \
  "ObjectCreated:Put|$SB|new-object.txt" \
  "$(receive_bodies "$INGEST_URL" | python3 -c '
import json, sys
for line in sys.stdin:
    for r in json.loads(line).get("Records", []):
        print("|".join([r["eventName"], r["s3"]["bucket"]["name"], r["s3"]["object"]["key"]]))
' | sort -u)"

check_run "create-stack.sh $SA $SB again, without --ingest, with --min-refresh-interval 60 (aws-cli deploy)" 0 \
  env S3EA_DEPLOY_TOOL=aws-cli scripts/create-stack.sh "${PREFIX_OPT[@]}" --min-refresh-interval 60 "$SA" "$SB"
check_eq "function $REFRESHER environment: the acknowledgement is gone with the interval of 60 s" \
  "LOG_LEVEL=INFO MIN_REFRESH_INTERVAL_SECONDS=60 TABLE_NAME=$TABLE" "$(env_of "$REFRESHER")"
check_log_has "a run without --alarm-topic says that StalenessTooHigh no longer matches the interval" \
  "alarm $PREFIX-StalenessTooHigh has the threshold $(staleness_ms 1000 0)(\\.0)? ms, not $(staleness_ms 1000 60) ms for REFRESH_DELAY_SECONDS=1000 and MIN_REFRESH_INTERVAL_SECONDS=60: run again with --alarm-topic ARN"
check_log_has "second create keeps the recorded mode" "==> Ingest: sqs \\(recorded on $AGGREGATOR\\)"
check_log_has "second create finds the ingest mapping" "Event source mapping $INGEST_QUEUE -> $AGGREGATOR"
check_log_has "second create keeps the buckets in the queue policy" "queue policy of $INGEST_QUEUE: $SA present"
check_sqs_stack "$SA" "$SB"

check_run "attach-bucket.sh --ingest eventbridge on the sqs stack" 1 \
  scripts/attach-bucket.sh "${PREFIX_OPT[@]}" --ingest eventbridge "$SC"
check_log_has "it says which mode the stack has" "was created with --ingest sqs, not eventbridge"
check_eq "nothing of ours on $SC after the refused attach" "" "$(our_entries "$SC")"

check_run "attach-bucket.sh $SC (the stack's mode)" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$SC"
check_log_has "attach uses the recorded mode" "==> Ingest: sqs \\(the stack's mode, recorded on $AGGREGATOR\\)"
check_run "attach-bucket.sh $SC again" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$SC"
check_sqs_stack "$SA" "$SB" "$SC"

# An entry of an older deployment, on the bucket with the foreign entries.
put_old_entry "$SA"
check_eq "old queue entry on $SA" "$NOTIFICATION_ID|$SQS_ARN:$INGEST_QUEUE|$OLD_EVENTS" "$(our_entries "$SA")"
check_eq "foreign entries on $SA with the old entry" "$FOREIGN_SA" "$(foreign_entries "$SA")"
check_run "attach-bucket.sh $SA (its entry is old)" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$SA"
check_log_has "attach says that it updates the entry's events" "$(update_line)"
check_sqs_stack "$SA" "$SB" "$SC"

check_run "attach-bucket.sh --ingest direct $SC (every stack can use direct)" 0 \
  scripts/attach-bucket.sh "${PREFIX_OPT[@]}" --ingest direct "$SC"
check_eq "entry on $SC after the switch to direct: our Lambda entry only" \
  "$NOTIFICATION_ID|$AGGREGATOR_ARN|$INGEST_ENTRY" "$(our_entries "$SC")"
check_eq "permissions after the switch to direct" "$(permission_line "$SC")" "$(permissions)"
check_eq "queue policy after the switch to direct: $SC gone" \
  "s3.amazonaws.com|sqs:SendMessage|$SQS_ARN:$INGEST_QUEUE|$ACCOUNT|$(arns_of "$SA" "$SB")" "$(queue_policy "$INGEST_QUEUE")"
check_eq "function $AGGREGATOR tag s3ea:ingest after an attach with --ingest direct" sqs "$(function_tag s3ea:ingest)"

check_run "detach-bucket.sh $SA (the bucket with the foreign entries)" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$SA"
check_eq "our entry on $SA after detach" "" "$(our_entries "$SA")"
check_eq "foreign entries on $SA after detach" "$FOREIGN_SA" "$(foreign_entries "$SA")"
check_eq "queue policy after detaching $SA" \
  "s3.amazonaws.com|sqs:SendMessage|$SQS_ARN:$INGEST_QUEUE|$ACCOUNT|$(arns_of "$SB")" "$(queue_policy "$INGEST_QUEUE")"
check_run "detach-bucket.sh $SA again" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$SA"
check_log_has "second detach finds nothing to remove" "notification $NOTIFICATION_ID: absent"

check_run "delete-stack.sh (finds $SB in the queue policy, $SC in the permissions)" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}"
check_log_has "delete found $SB" "==> Bucket $SB"
check_log_has "delete found $SC" "==> Bucket $SC"
check_all_gone "after delete"
check_eq "alarms $PREFIX-* after delete" 0 "$(alarm_count)"
check_eq "dashboard $PREFIX after delete" 0 "$(dashboard_count)"
for bucket in "$SA" "$SB" "$SC"; do
  check_eq "our entries on $bucket after delete" "" "$(our_entries "$bucket")"
done
check_eq "foreign entries on $SA after delete" "$FOREIGN_SA" "$(foreign_entries "$SA")"
check_run "delete-stack.sh a second time" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}"

# ---------------------------------------------------------------------------------
phase "11. --ingest eventbridge"
use_prefix "${PREFIX_BASE}Eb"
PREFIX_OPT=(--prefix "$PREFIX")
EA=s3ea-test-eb-a$BUCKET_SUFFIX
EB=s3ea-test-eb-b$BUCKET_SUFFIX
EC=s3ea-test-eb-c$BUCKET_SUFFIX
EO=s3ea-test-eb-other$BUCKET_SUFFIX # not ours: its owner turned EventBridge on
for bucket in "$EA" "$EB" "$EC" "$EO"; do
  awsm s3api create-bucket --bucket "$bucket" --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
done
put_foreign_config "$EA"
awsm s3api put-bucket-notification-configuration --bucket "$EO" --notification-configuration '{"EventBridgeConfiguration": {}}'
FOREIGN_EA=$(foreign_entries "$EA")

# Probes. moto neither invokes a function from a rule nor returns a bucket's
# EventBridgeConfiguration, so two rules of our own send events on the default bus to
# queues: "delivery" gets every S3 event (an event of a bucket there shows that its
# EventBridge delivery is on), and "rule" gets what the stack's rule matches (a copy of
# its pattern, renewed before each probe). Both must exist before the stack's rule:
# moto raises NotImplementedError for a rule with a Lambda target, which ends its loop
# over the rules after it (put-rule on an existing name keeps the rule's place).
PROBE=s3ea-probe$BUCKET_SUFFIX
PROBE_URL=$(awsm sqs create-queue --queue-name "$PROBE" --query QueueUrl --output text)
PROBE_RULE_URL=$(awsm sqs create-queue --queue-name "$PROBE-rule" --query QueueUrl --output text)
awsm events put-rule --name "$PROBE" --event-pattern '{"source": ["aws.s3"]}' >/dev/null
awsm events put-targets --rule "$PROBE" --targets "Id=probe,Arn=$SQS_ARN:$PROBE" >/dev/null
awsm events put-rule --name "$PROBE-rule" --event-pattern '{"source": ["s3ea.nothing"]}' >/dev/null
awsm events put-targets --rule "$PROBE-rule" --targets "Id=probe,Arn=$SQS_ARN:$PROBE-rule" >/dev/null
# probe BUCKET KEY: puts and deletes an object; prints the detail types of the bucket's
# events that each probe got, as "delivery: ... | rule: ...".
probe() {
  local pattern
  pattern=$(awsm events describe-rule --name "$EVENT_RULE" --query EventPattern --output text 2>/dev/null ||
    echo '{"source": ["s3ea.nothing"]}')
  awsm events put-rule --name "$PROBE-rule" --event-pattern "$pattern" >/dev/null
  awsm sqs purge-queue --queue-url "$PROBE_URL"
  awsm sqs purge-queue --queue-url "$PROBE_RULE_URL"
  put_object "$1" "$2"
  awsm s3api delete-object --bucket "$1" --key "$2" >/dev/null
  printf 'delivery: %s | rule: %s' "$(probe_types "$PROBE_URL" "$1" "$2")" "$(probe_types "$PROBE_RULE_URL" "$1" "$2")"
}
probe_types() { # QUEUE_URL BUCKET KEY
  receive_bodies "$1" | python3 -c '
import json, sys
types = set()
for line in sys.stdin:
    e = json.loads(line)
    # moto also sends "Object Tags Added" for a put: only these two matter here.
    if (e["detail"]["bucket"]["name"] == sys.argv[1] and e["detail"]["object"]["key"] == sys.argv[2]
            and e["detail-type"] in ("Object Created", "Object Deleted")):
        types.add(e["detail-type"])
print(",".join(sorted(types)))
' "$2" "$3"
}
# probe_lifecycle BUCKET KEY: puts the two "Object Deleted" events of a lifecycle
# expiration (reason "Lifecycle Expiration", S3 as the requester; moto's lifecycle
# rules send none) on the default bus, as S3 sends them; prints the deletion types of
# those that a copy of the stack's rule matched, sorted. One event per call, and its
# failure ignored: moto fails PutEvents with a 500 when an event matches the stack's
# rule (a Lambda target), after the probe rules, which come first, got it.
probe_lifecycle() {
  local pattern kind entry
  pattern=$(awsm events describe-rule --name "$EVENT_RULE" --query EventPattern --output text 2>/dev/null ||
    echo '{"source": ["s3ea.nothing"]}')
  awsm events put-rule --name "$PROBE-rule" --event-pattern "$pattern" >/dev/null
  awsm sqs purge-queue --queue-url "$PROBE_RULE_URL"
  for kind in "Permanently Deleted" "Delete Marker Created"; do
    entry=$(python3 -c '
import json, sys
bucket, key, kind = sys.argv[1:4]
print(json.dumps([{"Source": "aws.s3", "DetailType": "Object Deleted", "Resources": ["arn:aws:s3:::" + bucket],
    "Detail": json.dumps({"version": "0", "bucket": {"name": bucket},
        "object": {"key": key, "sequencer": "617b398000000000"}, "request-id": "20EB74C14654DC47",
        "requester": "s3.amazonaws.com", "reason": "Lifecycle Expiration", "deletion-type": kind})}]))
' "$1" "$2" "$kind")
    AWS_MAX_ATTEMPTS=1 awsm events put-events --entries "$entry" >/dev/null 2>&1 || true
  done
  receive_bodies "$PROBE_RULE_URL" | python3 -c '
import json, sys
kinds = set()
for line in sys.stdin:
    e = json.loads(line)
    d = e["detail"]
    if (d["bucket"]["name"] == sys.argv[1] and d["object"]["key"] == sys.argv[2]
            and e["detail-type"] == "Object Deleted" and d.get("reason") == "Lifecycle Expiration"):
        kinds.add(d["deletion-type"])
print(",".join(sorted(kinds)))
' "$1" "$2"
}
LIFECYCLE="Delete Marker Created,Permanently Deleted"
BOTH="Object Created,Object Deleted"
check_eq "probe $EO (its owner turned EventBridge on; no stack yet)" "delivery: $BOTH | rule: " "$(probe "$EO" k0)"
check_eq "probe $EA before create" "delivery:  | rule: " "$(probe "$EA" k0)"

check_run "create-stack.sh --ingest eventbridge $EA $EB" 0 \
  scripts/create-stack.sh "${PREFIX_OPT[@]}" --ingest eventbridge "$EA" "$EB"
check_log_has "create says the mode" "==> Ingest: eventbridge \\(--ingest\\)"
check_log_has "create prints the rule" "rule +$EVENT_RULE_ARN"

check_eventbridge_stack() { # BUCKET...: the attached buckets
  check_eq "rule $EVENT_RULE: state, source, detail types, buckets" \
    "ENABLED|aws.s3|Object Created,Object Deleted|$(names_of "$@")" "$(rule_summary)"
  check_eq "rule $EVENT_RULE: its pattern filters the detail on the bucket only (no reason, no deletion type)" \
    bucket "$(awsm events describe-rule --name "$EVENT_RULE" --query EventPattern --output text |
      python3 -c 'import json, sys; print(",".join(sorted(json.load(sys.stdin)["detail"])))')"
  for bucket in "$@"; do
    check_eq "rule $EVENT_RULE matches the lifecycle expirations of $bucket" "$LIFECYCLE" \
      "$(probe_lifecycle "$bucket" "expired/k$PASSED")"
  done
  check_eq "rule $EVENT_RULE targets: the aggregator, DLQ, retries, event age" \
    "Aggregator|$AGGREGATOR_ARN|$SQS_ARN:$AGGREGATOR_DLQ|185|86400" "$(rule_targets)"
  check_eq "permissions on $AGGREGATOR: the rule only" \
    "EventBridgeInvoke|{\"Service\": \"events.amazonaws.com\"}|lambda:InvokeFunction|$EVENT_RULE_ARN|" "$(permissions)"
  check_eq "queue $AGGREGATOR_DLQ policy: the rule may send its undeliverable events" \
    "events.amazonaws.com|sqs:SendMessage|$SQS_ARN:$AGGREGATOR_DLQ||$EVENT_RULE_ARN" "$(queue_policy "$AGGREGATOR_DLQ")"
  check_eq "role $AGGREGATOR_ROLE attached policies (no ingest policy)" "$AGGREGATOR_POLICY" "$(attached_policies "$AGGREGATOR_ROLE")"
  check_eq "function $AGGREGATOR tag s3ea:ingest" eventbridge "$(function_tag s3ea:ingest)"
  check_eq "queues with prefix $PREFIX (no ingest queues)" 3 "$(count_prefixed queues)"
  check_eq "rules with prefix $PREFIX (the stack's rule and the completion rule)" 2 "$(count_prefixed rules)"
  check_completion "the eventbridge stack"
  check_eq "event source mappings on $INGEST_QUEUE" 0 "$(count_prefixed ingestmappings)"
  for bucket in "$@"; do
    check_eq "notification entries of ours on $bucket (none with --ingest eventbridge)" "" "$(our_entries "$bucket")"
  done
  check_eq "foreign entries on $EA unchanged" "$FOREIGN_EA" "$(foreign_entries "$EA")"
  # moto's GetBucketNotificationConfiguration never returns EventBridgeConfiguration,
  # so the rule's tags, which record where attach-bucket turned it on, stand in here;
  # the probe below checks that the events really flow.
  check_eq "rule tags: the buckets whose EventBridge delivery attach-bucket turned on" \
    "$(printf 's3ea:eventbridge-enabled:%s\n' "$@" | sort | tr '\n' ' ' | sed 's/ $//')" "$(rule_tag_keys)"
}
check_eventbridge_stack "$EA" "$EB"

check_eq "probe $EA: EventBridge delivery on, the rule matches its events" "delivery: $BOTH | rule: $BOTH" "$(probe "$EA" k1)"
check_eq "probe $EB: the same" "delivery: $BOTH | rule: $BOTH" "$(probe "$EB" k1)"
check_eq "probe $EO: delivery on (its owner's), not matched by the rule" "delivery: $BOTH | rule: " "$(probe "$EO" k1)"
check_eq "probe $EC (not attached yet)" "delivery:  | rule: " "$(probe "$EC" k1)"
check_eq "rule $EVENT_RULE does not match the lifecycle expirations of $EO (not attached)" "" \
  "$(probe_lifecycle "$EO" expired/k1)"

check_run "create-stack.sh $EA $EB again, without --ingest" 0 scripts/create-stack.sh "${PREFIX_OPT[@]}" "$EA" "$EB"
check_log_has "second create keeps the recorded mode" "==> Ingest: eventbridge \\(recorded on $AGGREGATOR\\)"
check_log_has "second create finds the rule with its buckets" "exists \\(2 buckets in its event pattern\\): updating it"
check_log_has "second create finds the permission" "permission EventBridgeInvoke: present"
check_eventbridge_stack "$EA" "$EB"

check_run "attach-bucket.sh --ingest sqs on the eventbridge stack" 1 \
  scripts/attach-bucket.sh "${PREFIX_OPT[@]}" --ingest sqs "$EC"
check_log_has "it says which mode the stack has" "was created with --ingest eventbridge, not sqs"
check_run "attach-bucket.sh $EC" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$EC"
check_run "attach-bucket.sh $EC again" 0 scripts/attach-bucket.sh "${PREFIX_OPT[@]}" "$EC"
check_eventbridge_stack "$EA" "$EB" "$EC"
check_eq "probe $EC after attach" "delivery: $BOTH | rule: $BOTH" "$(probe "$EC" k2)"

check_run "detach-bucket.sh $EA (the bucket with the foreign entries)" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$EA"
check_log_has "detach turns EventBridge off" "EventBridge delivery: turning off"
check_eq "rule pattern after detaching $EA" "ENABLED|aws.s3|Object Created,Object Deleted|$(names_of "$EB" "$EC")" "$(rule_summary)"
check_eq "foreign entries on $EA after detach" "$FOREIGN_EA" "$(foreign_entries "$EA")"
check_eq "probe $EA after detach: delivery off, not matched by the rule" "delivery:  | rule: " "$(probe "$EA" k3)"
check_eq "probe $EB after detaching $EA: unchanged" "delivery: $BOTH | rule: $BOTH" "$(probe "$EB" k3)"
check_eq "rule tags after detaching $EA" "s3ea:eventbridge-enabled:$EB s3ea:eventbridge-enabled:$EC" "$(rule_tag_keys)"
check_run "detach-bucket.sh $EA again" 0 scripts/detach-bucket.sh "${PREFIX_OPT[@]}" "$EA"
check_log_has "second detach finds it absent from the pattern" "rule $EVENT_RULE: $EA absent from its event pattern"

check_run "delete-stack.sh (finds $EB and $EC in the rule's pattern)" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}"
check_log_has "delete found $EB" "==> Bucket $EB"
check_log_has "delete found $EC" "==> Bucket $EC"
check_log_has "delete removed the rule" "==> EventBridge rule $EVENT_RULE"
check_all_gone "after delete"
check_eq "probe $EB after delete: delivery off" "delivery:  | rule: " "$(probe "$EB" k4)"
check_eq "probe $EC after delete: delivery off" "delivery:  | rule: " "$(probe "$EC" k4)"
check_eq "probe $EO after delete: its owner's EventBridge delivery is untouched" "delivery: $BOTH | rule: " "$(probe "$EO" k4)"
check_eq "foreign entries on $EA after delete" "$FOREIGN_EA" "$(foreign_entries "$EA")"
check_run "delete-stack.sh a second time" 0 scripts/delete-stack.sh "${PREFIX_OPT[@]}"
for rule in "$PROBE" "$PROBE-rule"; do
  awsm events remove-targets --rule "$rule" --ids probe >/dev/null
  awsm events delete-rule --name "$rule"
done
awsm sqs delete-queue --queue-url "$PROBE_URL"
awsm sqs delete-queue --queue-url "$PROBE_RULE_URL"

# ---------------------------------------------------------------------------------
# A deployment of the 2018 scripts (issue 12): tests/deploy/fixture-2018.sh makes it
# with the reference's CLI commands; create-stack.sh must find it and stop, take it
# over with --migrate, and then change nothing on the next runs; delete-stack.sh
# removes what is left of one.

# add_foreign_entries BUCKET: another team's entries, added to what the bucket has.
add_foreign_entries() {
  local config
  config=$(awsm s3api get-bucket-notification-configuration --bucket "$1" --output json | python3 -c '
import json, sys
config = json.load(sys.stdin)
config.setdefault("QueueConfigurations", []).append({"Id": "foreign-queue", "QueueArn": sys.argv[1],
    "Events": ["s3:ObjectRestore:Completed"], "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "archive/"}]}}})
config.setdefault("LambdaFunctionConfigurations", []).append({"Id": "foreign-lambda",
    "LambdaFunctionArn": sys.argv[2], "Events": ["s3:ObjectTagging:*"]})
print(json.dumps(config))
' "$FOREIGN_QUEUE_ARN" "arn:aws:lambda:$REGION:$ACCOUNT:function:SomeoneElsesFunction")
  awsm s3api put-bucket-notification-configuration --bucket "$1" --notification-configuration "$config"
}
# The 2018 entries (Id s3-event-aggregator) of a bucket, as "Id|FunctionArn|Events".
legacy_entries() {
  awsm s3api get-bucket-notification-configuration --bucket "$1" --output text \
    --query "LambdaFunctionConfigurations[?Id == 's3-event-aggregator'].[Id, LambdaFunctionArn, join(',', sort(Events))]" |
    tr '\t' '|' | grep -v '^None$' || true
}
# Everything but ours and the 2018 entry, as compact JSON.
foreign_2018() {
  awsm s3api get-bucket-notification-configuration --bucket "$1" --output json \
    --query "{Queue: QueueConfigurations[?Id != '$NOTIFICATION_ID'], Topic: TopicConfigurations, Lambda: LambdaFunctionConfigurations[?Id != '$NOTIFICATION_ID' && Id != 's3-event-aggregator']}" |
    tr -d '[:space:]'
}
log_streams() { # FUNCTION: the number of log streams of its log group (moto writes one per invocation it attempts)
  awsm logs describe-log-streams --log-group-name "/aws/lambda/$1" --query 'length(logStreams)' --output text 2>/dev/null || echo 0
}
# recorded_ops: the recorded requests that the takeover's order is about, one per
# line, in order: "Op Name Detail".
recorded_ops() {
  python3 - "$MOTO_ENDPOINT" <<'PY2'
import base64, json, re, sys, urllib.parse, urllib.request
data = urllib.request.urlopen(sys.argv[1] + "/moto-api/recorder/download-recording", timeout=300).read()
for line in data.decode().splitlines():
    e = json.loads(line)
    body = e.get("body") or ""
    if e.get("body_encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    method, url = e["method"], urllib.parse.urlsplit(e["url"])
    path, query = urllib.parse.unquote(url.path), url.query
    target = {k.lower(): v for k, v in e["headers"].items()}.get("x-amz-target", "")
    def js():
        try:
            return json.loads(body or "{}")
        except ValueError:
            return {}
    m = re.fullmatch(r"/20\d\d-\d\d-\d\d/functions/([^/]+)(/.*)?", path)
    if m:
        name, rest = m.group(1), m.group(2) or ""
        if method == "PUT" and rest == "/configuration":
            b = js()
            print("UpdateFunctionConfiguration", name, "Runtime=%s Handler=%s Role=%s" % (b.get("Runtime"), b.get("Handler"), b.get("Role", "").rsplit("/", 1)[-1]))
        elif method == "PUT" and rest == "/code":
            print("UpdateFunctionCode", name, "Architectures=%s" % ",".join(js().get("Architectures") or []))
        elif method == "POST" and rest == "/policy":
            print("AddPermission", name, js().get("StatementId"))
        elif method == "DELETE" and rest.startswith("/policy/"):
            print("RemovePermission", name, rest.split("/")[-1])
        elif method == "DELETE" and rest == "/concurrency":
            print("DeleteFunctionConcurrency", name, "-")
        elif method == "DELETE" and rest == "":
            print("DeleteFunction", name, "-")
        elif method == "POST" and rest == "":
            print("CreateFunction", name, "-")
        continue
    m = re.fullmatch(r"/20\d\d-\d\d-\d\d/event-source-mappings/?([^/]*)", path)
    if m:
        if method == "POST":
            print("CreateEventSourceMapping", js().get("FunctionName", "").rsplit(":", 1)[-1], js().get("EventSourceArn", "").rsplit(":", 1)[-1])
        elif method == "DELETE":
            print("DeleteEventSourceMapping", m.group(1), "-")
        continue
    if method == "PUT" and query.startswith("notification"):
        print("PutBucketNotificationConfiguration", path.strip("/"), "-")
        continue
    if target.startswith("AWSEvents."):
        print(target.split(".")[-1], js().get("Name") or js().get("Rule") or "-", "-")
        continue
    form = urllib.parse.parse_qs(body) if "Action=" in body else {}
    action = (form.get("Action") or [""])[0]
    if action in ("DeleteRole", "DeletePolicy", "DetachRolePolicy"):
        print(action, (form.get("RoleName") or form.get("PolicyArn") or ["-"])[0].rsplit("/", 1)[-1], "-")
PY2
}
# check_before WHAT FIRST SECOND: in $WORK/ops, the first line that matches FIRST (grep
# -E) comes before the first line that matches SECOND; both must be there.
check_before() {
  local a b
  a=$(grep -nE -m1 -- "$2" "$WORK/ops" | cut -d: -f1 || true)
  b=$(grep -nE -m1 -- "$3" "$WORK/ops" | cut -d: -f1 || true)
  if [ -n "$a" ] && [ -n "$b" ] && [ "$a" -lt "$b" ]; then
    pass "$1 (request $a before request $b)"
  else
    fail "$1" "/$2/ at request ${a:-none}, /$3/ at request ${b:-none} (all: $WORK/ops)"
  fi
}

phase_2018() {
  local LA=s3ea-test-2018-a LB=s3ea-test-2018-b LC=s3ea-test-2018-c bucket before table_created queue_created
  local LEGACY_UUID action_url
  use_prefix "$DEFAULT_PREFIX_NAME"
  PREFIX_OPT=()
  OTHER_STATEMENTS=
  for bucket in "$LA" "$LB" "$LC"; do
    awsm s3api create-bucket --bucket "$bucket" --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
  done
  check_run "tests/deploy/fixture-2018.sh $LA $LB (the reference's commands)" 0 tests/deploy/fixture-2018.sh "$LA" "$LB"
  # Another team added entries to $LA later (the 2018 script wrote the configuration whole).
  add_foreign_entries "$LA"
  FOREIGN_LA=$(foreign_2018 "$LA")
  check_eq "2018 entry on $LA" "s3-event-aggregator|$AGGREGATOR_ARN|$OLD_EVENTS" "$(legacy_entries "$LA")"
  check_eq "2018 function $AGGREGATOR: runtime, handler, architecture, role" \
    "python3.6	s3_aggregator.lambda_handler	x86_64	arn:aws:iam::$ACCOUNT:role/S3EventAggregatorLambdaRole" \
    "$(function_field "$AGGREGATOR" '[Runtime, Handler, Architectures[0], Role]')"
  LEGACY_UUID=$(awsm lambda list-event-source-mappings --function-name S3StorageGatewayRefresh --query 'EventSourceMappings[0].UUID' --output text)
  table_created=$(awsm dynamodb describe-table --table-name "$TABLE" --query Table.CreationDateTime --output text)
  action_url=$(awsm sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text)
  queue_created=$(awsm sqs get-queue-attributes --queue-url "$action_url" --attribute-names CreatedTimestamp --query Attributes.CreatedTimestamp --output text)
  account_state "$LA" "$LB" "$LC" >"$WORK/state-2018.json"

  # A plain run finds it and stops before it changes anything.
  check_run "create-stack.sh $LA over the 2018 deployment" 1 scripts/create-stack.sh "$LA"
  check_log_has "it says what it found" "==> A deployment of the 2018 scripts is in account $ACCOUNT, region $REGION"
  check_log_has "it names the 2018 aggregator and its runtime" "function S3EventAggregator \\(python3\\.6, .*reserved concurrency 1\\): converted in place"
  check_log_has "it names the 2018 refresh function" "function S3StorageGatewayRefresh \\(python3\\.6\\)"
  check_log_has "it names the 2018 mapping" "event source mapping $LEGACY_UUID \\($ACTION_QUEUE -> S3StorageGatewayRefresh\\)"
  check_log_has "it names the permission of $LB, a bucket it was not given" "permission SID_$LB on S3EventAggregator"
  check_log_has "it names the 2018 entry of $LB" "notification entry s3-event-aggregator on $LB"
  for name in S3EventAggregatorLambdaRole S3AggregatorActionLambdaRole; do
    check_log_has "it names the role $name" "IAM role $name: removed"
  done
  for name in S3EventAggregatorDynamo S3EventAggregatorSqsWriter S3EventAggregatorSqsReader StorageGatewayRefreshPolicy; do
    check_log_has "it names the policy $name" "IAM policy $name: removed"
  done
  check_log_has "it says that the table and the queue are kept" "DynamoDB table $TABLE: kept"
  check_log_has "it names --migrate, with every bucket" "nothing was changed\\. Take it over with: scripts/create-stack.sh --migrate $LA $LB\$"
  check_state "after the refused plain run" "$WORK/state-2018.json" "$LA" "$LB" "$LC"

  check_run "create-stack.sh --migrate $LA (not naming $LB)" 1 scripts/create-stack.sh --migrate "$LA"
  check_log_has "it names the bucket left out" "the 2018 deployment also serves $LB, which this run does not name; nothing was changed"
  check_state "after the refused --migrate" "$WORK/state-2018.json" "$LA" "$LB" "$LC"
  check_run "attach-bucket.sh $LA over the 2018 entry" 1 scripts/attach-bucket.sh "$LA"
  check_log_has "attach-bucket.sh points to --migrate" "has the notification entry s3-event-aggregator of the 2018 deployment.*create-stack.sh --migrate"
  check_state "after the refused attach" "$WORK/state-2018.json" "$LA" "$LB" "$LC"

  # The takeover, recorded for its order.
  recorder reset-recording
  recorder start-recording
  check_run "create-stack.sh --migrate $LA $LB $LC ($LC is new)" 0 scripts/create-stack.sh --migrate "$LA" "$LB" "$LC"
  recorder stop-recording
  recorded_ops >"$WORK/ops"
  check_log_has "--migrate says that it takes the deployment over" "taking it over \\(--migrate\\)"
  check_before "our mapping exists before the 2018 mapping goes" \
    "^CreateEventSourceMapping $REFRESHER $ACTION_QUEUE" "^DeleteEventSourceMapping $LEGACY_UUID"
  check_before "the 2018 mapping goes before the aggregator sends messages of our format (converted)" \
    "^DeleteEventSourceMapping $LEGACY_UUID" "^UpdateFunctionConfiguration $AGGREGATOR "
  check_before "the completion rule comes after the 2018 mapping is gone" \
    "^DeleteEventSourceMapping $LEGACY_UUID" "^PutRule $COMPLETION_RULE"
  check_eq "the conversion's configuration update: runtime, handler, role" \
    "Runtime=provided.al2023 Handler=bootstrap Role=$AGGREGATOR_ROLE" \
    "$(grep -m1 "^UpdateFunctionConfiguration $AGGREGATOR " "$WORK/ops" | cut -d' ' -f3-)"
  check_before "the configuration (runtime) first, then the code" \
    "^UpdateFunctionConfiguration $AGGREGATOR Runtime=provided" "^UpdateFunctionCode $AGGREGATOR "
  # moto 5 keeps the architecture of create-function whatever update-function-code
  # says, so what is checked is what the script sent.
  check_eq "the conversion's code update: architecture" "Architectures=arm64" \
    "$(grep -m1 "^UpdateFunctionCode $AGGREGATOR " "$WORK/ops" | cut -d' ' -f3-)"
  check_eq "the 2018 reserved concurrency is removed" 1 "$(grep -c "^DeleteFunctionConcurrency $AGGREGATOR " "$WORK/ops" || true)"
  for bucket in "$LA" "$LB"; do
    check_before "$bucket: our permission before the entry is replaced" \
      "^AddPermission $AGGREGATOR S3Invoke-$bucket\$" "^PutBucketNotificationConfiguration $bucket "
    check_before "$bucket: the entry is replaced before SID_$bucket goes" \
      "^PutBucketNotificationConfiguration $bucket " "^RemovePermission $AGGREGATOR SID_$bucket\$"
  done
  check_eq "writes of the notification configuration of $LA: one (the 2018 entry and ours swap at once)" 1 \
    "$(grep -c "^PutBucketNotificationConfiguration $LA " "$WORK/ops" || true)"
  check_before "the 2018 refresh function goes after its mapping" \
    "^DeleteEventSourceMapping $LEGACY_UUID" "^DeleteFunction S3StorageGatewayRefresh "
  check_before "the aggregator has our role before the 2018 role goes" \
    "^UpdateFunctionConfiguration $AGGREGATOR " "^DeleteRole S3EventAggregatorLambdaRole "

  # Converted in place: the same function, ours in every setting.
  check_eq "function $AGGREGATOR after --migrate: runtime, handler, timeout, memory, role" \
    "provided.al2023	bootstrap	30	128	arn:aws:iam::$ACCOUNT:role/$AGGREGATOR_ROLE" \
    "$(function_field "$AGGREGATOR" '[Runtime, Handler, Timeout, MemorySize, Role]')"
  check_eq "function $AGGREGATOR code size = size of $ZIP_DIR/aggregator/bootstrap.zip" \
    "$(wc -c <"$ZIP_DIR/aggregator/bootstrap.zip" | tr -d ' ')" "$(function_field "$AGGREGATOR" CodeSize)"
  check_eq "function $AGGREGATOR environment: ours, with the 2018 REFRESH_DELAY_SECONDS and LOG_LEVEL kept" \
    "LOG_LEVEL=INFO QUEUE_URL=$action_url REFRESH_DELAY_SECONDS=30 TABLE_NAME=$TABLE" \
    "$(awsm lambda get-function-configuration --function-name "$AGGREGATOR" --query 'Environment.Variables' --output json | python3 -c 'import json, sys; print(" ".join("%s=%s" % kv for kv in sorted(json.load(sys.stdin).items())))')"
  check_eq "function $AGGREGATOR reserved concurrency (the 2018 one is gone)" None \
    "$(awsm lambda get-function-concurrency --function-name "$AGGREGATOR" --query ReservedConcurrentExecutions --output text)"
  check_eq "function $AGGREGATOR async retries, max event age, on-failure destination" \
    "2	21600	$SQS_ARN:$AGGREGATOR_DLQ" \
    "$(awsm lambda get-function-event-invoke-config --function-name "$AGGREGATOR" --query '[MaximumRetryAttempts, MaximumEventAgeInSeconds, DestinationConfig.OnFailure.Destination]' --output text)"
  check_eq "function $REFRESHER: runtime, handler, architecture, role" \
    "provided.al2023	bootstrap	arm64	arn:aws:iam::$ACCOUNT:role/$REFRESHER_ROLE" \
    "$(function_field "$REFRESHER" '[Runtime, Handler, Architectures[0], Role]')"
  check_eq "function S3StorageGatewayRefresh after --migrate" 0 \
    "$(awsm lambda list-functions --query "length(Functions[?FunctionName == 'S3StorageGatewayRefresh'])" --output text)"
  check_eq "log group /aws/lambda/S3StorageGatewayRefresh kept (the 2018 history)" 1 \
    "$(awsm logs describe-log-groups --log-group-name-prefix /aws/lambda/S3StorageGatewayRefresh --query 'length(logGroups)' --output text)"
  check_eq "event source mappings of S3StorageGatewayRefresh after --migrate" 0 \
    "$(awsm lambda list-event-source-mappings --query "length(EventSourceMappings[?ends_with(FunctionArn, ':function:S3StorageGatewayRefresh')])" --output text)"
  check_eq "event source mappings on $ACTION_QUEUE: ours only, enabled" \
    "arn:aws:lambda:$REGION:$ACCOUNT:function:$REFRESHER	Enabled" \
    "$(awsm lambda list-event-source-mappings --event-source-arn "$SQS_ARN:$ACTION_QUEUE" --query 'EventSourceMappings[].[FunctionArn, State]' --output text)"
  check_eq "permissions on $AGGREGATOR: ours for the three buckets, no SID_<bucket>" \
    "$(for bucket in "$LA" "$LB" "$LC"; do permission_line "$bucket"; echo; done | sort | sed '/^$/d')" "$(permissions)"
  for bucket in "$LA" "$LB" "$LC"; do
    check_eq "notification entry on $bucket after --migrate" "$NOTIFICATION_ID|$AGGREGATOR_ARN|$OUR_EVENTS" "$(our_entries "$bucket")"
    check_eq "2018 entry on $bucket after --migrate" "" "$(legacy_entries "$bucket")"
  done
  check_eq "foreign entries on $LA kept" "$FOREIGN_LA" "$(foreign_2018 "$LA")"
  for name in S3EventAggregatorLambdaRole S3AggregatorActionLambdaRole; do
    check_eq "2018 role $name after --migrate" 0 "$(awsm iam list-roles --query "length(Roles[?RoleName == '$name'])" --output text)"
  done
  for name in S3EventAggregatorDynamo S3EventAggregatorSqsWriter S3EventAggregatorSqsReader StorageGatewayRefreshPolicy; do
    check_eq "2018 policy $name after --migrate" 0 "$(awsm iam list-policies --scope Local --query "length(Policies[?PolicyName == '$name'])" --output text)"
  done
  check_eq "table $TABLE kept (same creation time)" "$table_created" \
    "$(awsm dynamodb describe-table --table-name "$TABLE" --query Table.CreationDateTime --output text)"
  check_eq "table $TABLE: the 2018 items kept (BucketName, timestamp, share)" "$LA $LB" \
    "$(awsm dynamodb scan --table-name "$TABLE" --query 'Items[?timestamp && share].BucketName.S' --output text | tr '\t' '\n' | sort | tr '\n' ' ' | sed 's/ $//')"
  check_eq "table $TABLE: key schema, billing mode (on-demand, the default)" "BucketName	HASH	PAY_PER_REQUEST" \
    "$(awsm dynamodb describe-table --table-name "$TABLE" --query 'Table.[KeySchema[0].AttributeName, KeySchema[0].KeyType, BillingModeSummary.BillingMode]' --output text)"
  check_eq "queue $ACTION_QUEUE kept (same URL and creation time)" "$action_url $queue_created" \
    "$(awsm sqs get-queue-url --queue-name "$ACTION_QUEUE" --query QueueUrl --output text) $(awsm sqs get-queue-attributes --queue-url "$action_url" --attribute-names CreatedTimestamp --query Attributes.CreatedTimestamp --output text)"
  check_eq "queue $ACTION_QUEUE: our visibility timeout and redrive policy" "360 $SQS_ARN:$ACTION_DLQ" \
    "$(queue_attribute "$ACTION_QUEUE" VisibilityTimeout) $(queue_attribute "$ACTION_QUEUE" RedrivePolicy | python3 -c 'import json, sys; print(json.load(sys.stdin)["deadLetterTargetArn"])')"
  check_completion "after --migrate"

  # A second --migrate, and a plain run: nothing changes.
  account_state "$LA" "$LB" "$LC" >"$WORK/state-taken-over.json"
  check_run "create-stack.sh --migrate $LA $LB $LC again" 0 scripts/create-stack.sh --migrate "$LA" "$LB" "$LC"
  check_log_has "the second --migrate finds no 2018 deployment" "none found: nothing to take over"
  check_state "after the second --migrate" "$WORK/state-taken-over.json" "$LA" "$LB" "$LC"
  check_run "create-stack.sh $LA $LB $LC (a plain run after the takeover)" 0 scripts/create-stack.sh "$LA" "$LB" "$LC"
  check_state "after the plain run" "$WORK/state-taken-over.json" "$LA" "$LB" "$LC"

  # Events reach the new functions. moto runs no function code, but it tries to invoke
  # each function an event is for, and each try leaves a log stream in the function's
  # log group: one per put for the aggregator (our entry alone: the 2018 entry would
  # make two), one per message for the refresher, none for the 2018 refresher.
  for bucket in "$LA" "$LB" "$LC"; do
    before=$(log_streams "$AGGREGATOR")
    put_object "$bucket" "after-takeover.txt"
    check_eq "an object put in $bucket invokes $AGGREGATOR once (moto's invocation attempts)" $((before + 1)) "$(log_streams "$AGGREGATOR")"
  done
  before=$(log_streams "$REFRESHER")
  awsm sqs send-message --queue-url "$action_url" --message-body '{}' \
    --message-attributes "{\"bucket-name\": {\"DataType\": \"String\", \"StringValue\": \"$LA\"}, \"timestamp\": {\"DataType\": \"Number\", \"StringValue\": \"1534097642149\"}}" >/dev/null
  check_eq "a refresh message of the 2018 shape on $ACTION_QUEUE invokes $REFRESHER" $((before + 1)) "$(log_streams "$REFRESHER")"
  check_eq "and not the 2018 S3StorageGatewayRefresh" 0 "$(log_streams S3StorageGatewayRefresh)"
  awsm sqs purge-queue --queue-url "$action_url"
  before=$(log_streams "$REFRESHER")
  awsm events put-events --entries "$(python3 -c '
import json, sys
print(json.dumps([{"Source": "aws.storagegateway", "DetailType": "Storage Gateway Refresh Cache Event",
    "Resources": ["arn:aws:storagegateway:%s:%s:share/share-0123ABCD" % (sys.argv[1], sys.argv[2])],
    "Detail": json.dumps({"folderList": ["/"], "shareId": "share-0123ABCD", "notificationId": "4a7e1f2c-0000-4000-8000-000000000000"})}]))
' "$REGION" "$ACCOUNT")" >/dev/null
  check_eq "a Storage Gateway Refresh Cache Event reaches $ACTION_QUEUE through $COMPLETION_RULE" \
    "aws.storagegateway|Storage Gateway Refresh Cache Event|4a7e1f2c-0000-4000-8000-000000000000" \
    "$(receive_bodies "$action_url" | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("|".join([e.get("source", ""), e.get("detail-type", ""), e.get("detail", {}).get("notificationId", "")]))
')"
  check_eq "and invokes $REFRESHER" $((before + 1)) "$(log_streams "$REFRESHER")"

  check_run "delete-stack.sh after the takeover" 0 scripts/delete-stack.sh
  check_log_has "delete removes the 2018 log group that the takeover kept" "==> Log group /aws/lambda/S3StorageGatewayRefresh"
  check_all_gone "after the takeover and delete"
  check_eq "log group /aws/lambda/S3StorageGatewayRefresh after delete" 0 \
    "$(awsm logs describe-log-groups --log-group-name-prefix /aws/lambda/S3StorageGatewayRefresh --query 'length(logGroups)' --output text)"
  check_eq "foreign entries on $LA after delete" "$FOREIGN_LA" "$(foreign_2018 "$LA")"
  for bucket in "$LA" "$LB" "$LC"; do
    check_eq "our entry on $bucket after delete" "" "$(our_entries "$bucket")"
  done

  # delete-stack.sh over a 2018 deployment that was never taken over.
  check_run "tests/deploy/fixture-2018.sh $LB again" 0 tests/deploy/fixture-2018.sh "$LB"
  check_run "delete-stack.sh over the 2018 deployment" 0 scripts/delete-stack.sh
  check_log_has "delete says what it found" "==> A deployment of the 2018 scripts is in account $ACCOUNT, region $REGION: deleting it with the stack"
  check_eq "2018 entry on $LB after delete" "" "$(legacy_entries "$LB")"
  check_eq "functions S3EventAggregator and S3StorageGatewayRefresh after delete" 0 \
    "$(awsm lambda list-functions --query "length(Functions[?FunctionName == 'S3EventAggregator' || FunctionName == 'S3StorageGatewayRefresh'])" --output text)"
  check_eq "mappings after delete" 0 "$(awsm lambda list-event-source-mappings --query 'length(EventSourceMappings)' --output text)"
  check_eq "2018 roles after delete" 0 \
    "$(awsm iam list-roles --query "length(Roles[?RoleName == 'S3EventAggregatorLambdaRole' || RoleName == 'S3AggregatorActionLambdaRole'])" --output text)"
  check_eq "2018 policies after delete" 0 \
    "$(awsm iam list-policies --scope Local --query "length(Policies[?contains(['S3EventAggregatorDynamo', 'S3EventAggregatorSqsWriter', 'S3EventAggregatorSqsReader', 'StorageGatewayRefreshPolicy'], PolicyName)])" --output text)"
  check_all_gone "after deleting the 2018 deployment"
  check_run "delete-stack.sh again" 0 scripts/delete-stack.sh
  check_log_has "the second delete finds nothing of 2018" "none found"
}

phase "12. Taking over a deployment of the 2018 scripts (create-stack.sh --migrate)"
if [ -n "$BUCKET_SUFFIX" ]; then
  # The 2018 names are fixed (no prefix): on a shared moto server they could be someone else's.
  echo "      skipped: the 2018 deployment has fixed names, and the moto server at MOTO_ENDPOINT is shared"
elif ! python3 -c 'import boto3' 2>/dev/null; then
  fail "python3 can import boto3 (moto's dependency), for the state snapshots"
else
  phase_2018
fi

FINISHED=true
summary
