# shellcheck shell=bash
# shellcheck disable=SC2034 # the LEGACY_* names set here are read by the scripts that source this
# A deployment of the 2018 design (made with its blog post's CLI commands and its
# create-stack.sh), found and taken over (docs/takeover-2018.md).
# Sourced by scripts/create-stack.sh and scripts/delete-stack.sh, after
# scripts/lib/stack.sh (it uses aws_cli, aws_maybe, step, info, die, the names of
# set_names and set_arns, delete_policy and delete_role).
#
# The 2018 names are fixed: they do not follow --prefix. Its table and queue have the
# names of our default prefix (S3EventAggregator, S3EventAggregatorActionQueue), and so
# has its aggregator function (S3EventAggregator): a takeover is the stack of the
# default prefix, which keeps the table and the queue and converts the function.

LEGACY_AGGREGATOR=S3EventAggregator
LEGACY_REFRESHER=S3StorageGatewayRefresh
# The aggregator's resource-policy statement per bucket: SID_<bucket>.
LEGACY_SID_PREFIX=SID_
LEGACY_ROLES=(S3EventAggregatorLambdaRole S3AggregatorActionLambdaRole)
LEGACY_POLICIES=(S3EventAggregatorDynamo S3EventAggregatorSqsWriter S3EventAggregatorSqsReader StorageGatewayRefreshPolicy)
LEGACY_TABLE=S3EventAggregator
LEGACY_QUEUE=S3EventAggregatorActionQueue
# LEGACY_NOTIFICATION_ID (s3-event-aggregator) is in scripts/lib/stack.sh, with the
# notification code that drops it.

# find_legacy BUCKET...: looks for each part of a 2018 deployment in the target account
# and region, and for the 2018 notification entry on the given buckets and on the
# buckets that the 2018 permissions name. Changes nothing. Sets:
#   LEGACY_FOUND             true when any part exists
#   LEGACY_REPORT            one line per part: what it is (LEGACY_TAKEOVER: what --migrate does)
#   LEGACY_AGGREGATOR_PYTHON true when S3EventAggregator runs on a Python runtime
#   LEGACY_REFRESHER_EXISTS  true when S3StorageGatewayRefresh exists
#   LEGACY_MAPPINGS          the UUIDs of S3StorageGatewayRefresh's event source mappings
#   LEGACY_PERMISSION_BUCKETS the buckets of the SID_<bucket> statements on S3EventAggregator
#   LEGACY_ENTRY_BUCKETS     the buckets whose configuration has the s3-event-aggregator entry
#   LEGACY_BUCKETS           the existing buckets of both lists: those that --migrate must be given
#   LEGACY_GONE_BUCKETS      permission buckets that no longer exist
#   LEGACY_ROLES_FOUND, LEGACY_POLICIES_FOUND  the 2018 roles and policies that exist
find_legacy() {
  local runtime handler role arch reserved policy bucket candidates=() line uuid source
  LEGACY_FOUND=false LEGACY_AGGREGATOR_PYTHON=false LEGACY_REFRESHER_EXISTS=false LEGACY_MAPPINGS=
  LEGACY_REPORT=() LEGACY_TAKEOVER=() LEGACY_PERMISSION_BUCKETS=() LEGACY_ENTRY_BUCKETS=() LEGACY_BUCKETS=() LEGACY_GONE_BUCKETS=()
  LEGACY_ROLES_FOUND=() LEGACY_POLICIES_FOUND=()

  # The aggregator: the 2018 one runs Python; ours, under the same name, does not.
  if aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$LEGACY_AGGREGATOR" \
    --query '[Runtime, Handler, Role, Architectures[0]]' --output text; then
    read -r runtime handler role arch <<<"$AWS_OUT"
    case $runtime in
      python*)
        LEGACY_AGGREGATOR_PYTHON=true
        reserved=$(aws_cli lambda get-function-concurrency --function-name "$LEGACY_AGGREGATOR" \
          --query ReservedConcurrentExecutions --output text)
        [ "$reserved" != None ] || reserved=none
        legacy_part "function $LEGACY_AGGREGATOR ($runtime, handler $handler, $arch, role ${role##*/}, reserved concurrency $reserved)" "converted in place to provided.al2023, handler bootstrap, ${ARCH:-arm64}, role ${PREFIX}AggregatorRole, no reserved concurrency"
        ;;
    esac
    # Its SID_<bucket> statements, whatever the runtime (a takeover that stopped after
    # the conversion leaves them on our function).
    policy=
    if aws_maybe 'ResourceNotFoundException' lambda get-policy --function-name "$LEGACY_AGGREGATOR" --query Policy --output text; then
      policy=$AWS_OUT
    fi
    while IFS= read -r bucket; do
      if [ -n "$bucket" ]; then LEGACY_PERMISSION_BUCKETS+=("$bucket"); fi
    done < <(printf '%s' "$policy" | { grep -Eo "\"Sid\" *: *\"${LEGACY_SID_PREFIX}[a-z0-9.-]+\"" || true; } |
      sed -e "s/.*\"$LEGACY_SID_PREFIX//" -e 's/"$//' | sort -u)
  fi

  # The refresh function and its event source mappings (found by function ARN among
  # the region's mappings, so that a mapping that outlived its function counts too).
  if aws_maybe 'ResourceNotFoundException' lambda get-function-configuration --function-name "$LEGACY_REFRESHER" \
    --query Runtime --output text; then
    LEGACY_REFRESHER_EXISTS=true
    legacy_part "function $LEGACY_REFRESHER ($AWS_OUT)" "removed once its mapping is gone (its log group /aws/lambda/$LEGACY_REFRESHER is kept)"
  fi
  while IFS=$'\t' read -r uuid source; do
    if [ -z "$uuid" ] || [ "$uuid" = None ]; then continue; fi
    LEGACY_MAPPINGS="$LEGACY_MAPPINGS${LEGACY_MAPPINGS:+ }$uuid"
    legacy_part "event source mapping $uuid (${source##*:} -> $LEGACY_REFRESHER)" "removed once ${PREFIX}Refresher reads the action queue"
  done < <(aws_cli lambda list-event-source-mappings --output text \
    --query "EventSourceMappings[?FunctionArn == 'arn:aws:lambda:$REGION:$ACCOUNT_ID:function:$LEGACY_REFRESHER' && State != 'Deleting'].[UUID, EventSourceArn]")

  # The buckets: the permissions name them; the given buckets may carry the entry too.
  for bucket in ${LEGACY_PERMISSION_BUCKETS[@]+"${LEGACY_PERMISSION_BUCKETS[@]}"}; do
    if bucket_exists "$bucket"; then
      legacy_part "permission $LEGACY_SID_PREFIX$bucket on $LEGACY_AGGREGATOR" "removed once the bucket's events reach the aggregator through our entry"
    else
      LEGACY_GONE_BUCKETS+=("$bucket")
      legacy_part "permission $LEGACY_SID_PREFIX$bucket on $LEGACY_AGGREGATOR" "removed (the bucket $bucket does not exist any more)"
    fi
  done
  while IFS= read -r bucket; do
    if [ -n "$bucket" ]; then candidates+=("$bucket"); fi
  done < <(printf '%s\n' "$@" ${LEGACY_PERMISSION_BUCKETS[@]+"${LEGACY_PERMISSION_BUCKETS[@]}"} | sort -u)
  for bucket in ${candidates[@]+"${candidates[@]}"}; do
    bucket_exists "$bucket" || continue
    load_notification_state "$bucket"
    if [ "$LEGACY_ENTRY" != 0 ]; then
      LEGACY_ENTRY_BUCKETS+=("$bucket")
      legacy_part "notification entry $LEGACY_NOTIFICATION_ID on $bucket" "replaced by ${PREFIX}ObjectEvents in one write (its other entries kept)"
    fi
  done
  while IFS= read -r bucket; do
    if [ -n "$bucket" ]; then LEGACY_BUCKETS+=("$bucket"); fi
  done < <(
    for bucket in ${LEGACY_ENTRY_BUCKETS[@]+"${LEGACY_ENTRY_BUCKETS[@]}"} ${LEGACY_PERMISSION_BUCKETS[@]+"${LEGACY_PERMISSION_BUCKETS[@]}"}; do
      case " ${LEGACY_GONE_BUCKETS[*]-} " in *" $bucket "*) ;; *) printf '%s\n' "$bucket" ;; esac
    done | sort -u
  )

  for line in "${LEGACY_ROLES[@]}"; do
    if aws_maybe 'NoSuchEntity' iam get-role --role-name "$line" --query Role.Arn --output text; then
      LEGACY_ROLES_FOUND+=("$line")
      legacy_part "IAM role $line" "removed"
    fi
  done
  for line in "${LEGACY_POLICIES[@]}"; do
    if aws_maybe 'NoSuchEntity' iam get-policy --policy-arn "arn:aws:iam::$ACCOUNT_ID:policy/$line" --query Policy.Arn --output text; then
      LEGACY_POLICIES_FOUND+=("$line")
      legacy_part "IAM policy $line" "removed"
    fi
  done

  [ "${#LEGACY_REPORT[@]}" -gt 0 ] || return 0
  LEGACY_FOUND=true
  if aws_maybe 'ResourceNotFoundException' dynamodb describe-table --table-name "$LEGACY_TABLE" --query Table.TableName --output text; then
    legacy_part "DynamoDB table $LEGACY_TABLE" "kept, with its items (the 2018 items do no harm: the functions read only attributes of their own)"
  fi
  if aws_maybe 'NonExistentQueue|QueueDoesNotExist' sqs get-queue-url --queue-name "$LEGACY_QUEUE" --query QueueUrl --output text; then
    legacy_part "SQS queue $LEGACY_QUEUE" "kept, with its messages (the refresher reads the 2018 messages too)"
  fi
}

# legacy_part WHAT TAKEOVER: one part that find_legacy found, and what a takeover does
# with it.
legacy_part() {
  LEGACY_REPORT+=("$1")
  LEGACY_TAKEOVER+=("$2")
}

# print_legacy migrate|delete TITLE: prints what find_legacy found, each part with what
# --migrate does with it, or with "deleted".
print_legacy() {
  local i
  step "A deployment of the 2018 scripts is in account $ACCOUNT_ID, region $REGION$2:"
  for i in "${!LEGACY_REPORT[@]}"; do
    if [ "$1" = migrate ]; then
      info "${LEGACY_REPORT[$i]}: ${LEGACY_TAKEOVER[$i]}"
    else
      info "${LEGACY_REPORT[$i]}: deleted"
    fi
  done
}

# legacy_missing_buckets BUCKET...: prints the buckets of LEGACY_BUCKETS that are not
# among the given ones, space-separated.
legacy_missing_buckets() {
  local bucket missing=
  for bucket in ${LEGACY_BUCKETS[@]+"${LEGACY_BUCKETS[@]}"}; do
    case " $* " in *" $bucket "*) ;; *) missing="$missing${missing:+ }$bucket" ;; esac
  done
  printf '%s' "$missing"
}

# ---------------------------------------------------------------------------------
# The takeover steps (create-stack.sh --migrate). Each one skips what is already done,
# so that a run that stopped half way is finished by the next one.

# remove_legacy_mappings: the 2018 event source mappings, once ours exists (the caller
# runs this after ensure_event_source_mapping). The refresher reads both the 2018
# messages (body {}, attribute bucket-name: the whole bucket is refreshed) and ours,
# so every message on the queue is still read.
remove_legacy_mappings() {
  local uuid
  step "Event source mappings of the 2018 function $LEGACY_REFRESHER"
  if [ -z "$LEGACY_MAPPINGS" ]; then
    info "none"
    return 0
  fi
  for uuid in $LEGACY_MAPPINGS; do
    # Disabled first: it stops taking messages at once, while a deletion goes through
    # the state Deleting. (moto also keeps a deleted mapping on its queue, and skips
    # it only when it is disabled.)
    info "disabling, then deleting $uuid ($REFRESHER_FUNCTION reads $ACTION_QUEUE now)"
    if aws_maybe 'ResourceNotFoundException' lambda update-event-source-mapping --uuid "$uuid" --no-enabled; then
      wait_mapping_settled "$uuid"
      aws_maybe 'ResourceNotFoundException' lambda delete-event-source-mapping --uuid "$uuid" || info "already gone"
    else
      info "already gone"
    fi
  done
}

# convert_legacy_aggregator ENVIRONMENT_JSON: the 2018 function S3EventAggregator
# becomes our aggregator, in place, so that its ARN (which the buckets' 2018 entries
# and permissions name) keeps working. First the configuration (a function on a
# deprecated runtime may still be moved to a supported one), then the code and the
# architecture. Between the two updates the function cannot run; an event that
# arrives then fails, and Lambda's asynchronous retry, set first, delivers it again
# about a minute later to the converted function.
convert_legacy_aggregator() {
  local environment=$1 zip="$LAMBDA_DIR/aggregator/bootstrap.zip"
  $LEGACY_AGGREGATOR_PYTHON || return 0
  step "Converting the 2018 function $AGGREGATOR_FUNCTION in place (the buckets' entries and permissions name its ARN)"
  # Without a configuration of its own, Lambda retries twice over up to 6 hours.
  if aws_maybe 'ResourceNotFoundException' lambda get-function-event-invoke-config --function-name "$AGGREGATOR_FUNCTION" \
    --query '[MaximumRetryAttempts, MaximumEventAgeInSeconds]' --output text; then
    info "asynchronous invocation: $AGGREGATOR_RETRIES retries, events kept ${AGGREGATOR_MAX_EVENT_AGE}s, so that an event that arrives during the conversion is retried (was: $AWS_OUT)"
    aws_cli lambda put-function-event-invoke-config --function-name "$AGGREGATOR_FUNCTION" \
      --maximum-retry-attempts "$AGGREGATOR_RETRIES" --maximum-event-age-in-seconds "$AGGREGATOR_MAX_EVENT_AGE" >/dev/null
    wait_function_ready "$AGGREGATOR_FUNCTION"
  else
    info "asynchronous invocation: Lambda's default (2 retries, events kept 6 hours), so an event that arrives during the conversion is retried"
  fi
  info "configuration: runtime provided.al2023, handler bootstrap, role $AGGREGATOR_ROLE, ${AGGREGATOR_TIMEOUT}s, ${AGGREGATOR_MEMORY} MB, our environment"
  retry_for_iam "update-function-configuration $AGGREGATOR_FUNCTION" aws_cli lambda update-function-configuration \
    --function-name "$AGGREGATOR_FUNCTION" --runtime provided.al2023 --handler bootstrap --role "$AGGREGATOR_ROLE_ARN" \
    --timeout "$AGGREGATOR_TIMEOUT" --memory-size "$AGGREGATOR_MEMORY" --environment "$environment" >/dev/null
  wait_function_ready "$AGGREGATOR_FUNCTION"
  info "code: $zip, architecture $ARCH"
  aws_cli lambda update-function-code --function-name "$AGGREGATOR_FUNCTION" --architectures "$ARCH" \
    --zip-file "fileb://$zip" >/dev/null
  wait_function_ready "$AGGREGATOR_FUNCTION"
}

# remove_legacy_concurrency: the 2018 reserved concurrency of 1 on the aggregator goes
# (ours has none: docs/deployment.md, "Concurrency").
remove_legacy_concurrency() {
  local reserved
  reserved=$(aws_cli lambda get-function-concurrency --function-name "$AGGREGATOR_FUNCTION" \
    --query ReservedConcurrentExecutions --output text)
  if [ "$reserved" = None ] || [ -z "$reserved" ]; then
    info "$AGGREGATOR_FUNCTION: no reserved concurrency"
  else
    info "$AGGREGATOR_FUNCTION: removing the reserved concurrency of $reserved (2018)"
    aws_cli lambda delete-function-concurrency --function-name "$AGGREGATOR_FUNCTION"
  fi
}

# remove_legacy_permissions: the SID_<bucket> statements, each once the bucket's
# configuration has no 2018 entry left (attach_bucket replaced it, after it added the
# bucket's own grant), or when the bucket is gone.
remove_legacy_permissions() {
  local bucket sid
  step "Permissions $LEGACY_SID_PREFIX<bucket> of the 2018 deployment on $AGGREGATOR_FUNCTION"
  if [ "${#LEGACY_PERMISSION_BUCKETS[@]}" -eq 0 ]; then
    info "none"
    return 0
  fi
  for bucket in "${LEGACY_PERMISSION_BUCKETS[@]}"; do
    sid=$LEGACY_SID_PREFIX$bucket
    if bucket_exists "$bucket"; then
      load_notification_state "$bucket"
      [ "$LEGACY_ENTRY" = 0 ] || die "bucket $bucket still has the 2018 entry $LEGACY_NOTIFICATION_ID: not removing $sid"
      info "permission $sid: removing (the events of $bucket reach $AGGREGATOR_FUNCTION through ${NOTIFICATION_ID})"
    else
      info "permission $sid: removing (the bucket does not exist)"
    fi
    aws_maybe 'ResourceNotFoundException' lambda remove-permission --function-name "$AGGREGATOR_FUNCTION" \
      --statement-id "$sid" || info "already gone"
  done
}

# remove_legacy_refresher: the function S3StorageGatewayRefresh (with its reserved
# concurrency), once no mapping feeds it. Its log group stays: it is the 2018 history.
remove_legacy_refresher() {
  step "Lambda function $LEGACY_REFRESHER (2018)"
  if aws_maybe 'ResourceNotFoundException' lambda delete-function --function-name "$LEGACY_REFRESHER"; then
    info "deleted (its log group /aws/lambda/$LEGACY_REFRESHER is kept; delete-stack.sh removes it)"
  else
    info "absent"
  fi
}

# remove_legacy_iam: the 2018 policies (detached from every role first) and roles,
# once no function uses a role any more.
remove_legacy_iam() {
  local name users
  for name in "${LEGACY_POLICIES[@]}"; do delete_policy "arn:aws:iam::$ACCOUNT_ID:policy/$name"; done
  for name in "${LEGACY_ROLES[@]}"; do
    users=$(aws_cli lambda list-functions --output text \
      --query "Functions[?Role == 'arn:aws:iam::$ACCOUNT_ID:role/$name'].FunctionName")
    if [ -n "$users" ] && [ "$users" != None ]; then
      die "IAM role $name is still the role of function(s) $users: not deleting it"
    fi
    delete_role "$name"
  done
}
