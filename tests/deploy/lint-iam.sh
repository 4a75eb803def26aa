#!/usr/bin/env bash
# Lints every IAM policy document in iam/ with parliament (PyPI `parliament`), after
# filling in its placeholders the way scripts/create-stack.sh and scripts/lib/stack.sh
# do. The identity policies and the queues' resource policies (*-queue-policy.json)
# must have no finding at all. A trust policy has no Resource element, which parliament
# (an identity-policy linter) always reports as MALFORMED; that one finding is accepted
# (iam/README.md), and any other finding fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

# shellcheck source=scripts/lib/stack.sh disable=SC1091 # followed with shellcheck -x
. scripts/lib/stack.sh

# The command, or the module when a fresh pip install is not on PATH yet (pyenv shims).
if command -v parliament >/dev/null 2>&1; then
  PARLIAMENT=(parliament)
elif python3 -c 'import parliament.cli' 2>/dev/null; then
  PARLIAMENT=(python3 -m parliament.cli)
else
  die "parliament is not installed: python3 -m pip install parliament"
fi

# Any region and account will do: only the shape of the ARNs matters to the linter.
# shellcheck disable=SC2034 # both are read by render_policy
REGION=eu-west-1 ACCOUNT_ID=123456789012
set_names "$DEFAULT_PREFIX"
rendered=$S3EA_TMP/rendered
mkdir -p "$rendered"

identity=()
trust=()
for file in iam/*.json; do
  name=$(basename "$file")
  case $name in
    aggregator-*) function=$AGGREGATOR_FUNCTION ;;
    refresher-*) function=$REFRESHER_FUNCTION ;;
    *) function=Function ;;
  esac
  # Two buckets for the ingest queue's policy, which lists the attached buckets.
  render_policy "$file" "$function" example-bucket example.bucket.two >"$rendered/$name"
  if grep -Eq 'REGION|ACCOUNT_ID|TABLE_NAME|ACTION_QUEUE|INGEST_QUEUE|AGGREGATOR_DLQ|EVENT_RULE|COMPLETION_RULE|FUNCTION_NAME|SOURCE_BUCKET_ARNS' "$rendered/$name"; then
    die "$file: a placeholder is left after rendering"
  fi
  python3 -m json.tool "$rendered/$name" >/dev/null || die "$file: not JSON after rendering"
  case $name in
    *-trust.json) trust+=("$rendered/$name") ;;
    *) identity+=("$rendered/$name") ;;
  esac
done
[ "${#identity[@]}" -gt 0 ] || die "no identity policy found in iam/"

failed=0
step "parliament: ${#identity[@]} identity and queue policies (no finding allowed)"
list=$(IFS=,; printf '%s' "${identity[*]}")
# --files, with stdin closed: --file reads stdin and fails without a terminal.
if "${PARLIAMENT[@]}" --files "$list" </dev/null >"$S3EA_TMP/identity.txt" 2>&1 && [ ! -s "$S3EA_TMP/identity.txt" ]; then
  for file in "${identity[@]}"; do info "iam/$(basename "$file"): no findings"; done
else
  cat "$S3EA_TMP/identity.txt" >&2
  failed=1
fi

accepted='"issue": "MALFORMED".*"detail": "Statement contains neither Resource nor NotResource"'
for file in "${trust[@]}"; do
  step "parliament: iam/$(basename "$file") (trust policy)"
  "${PARLIAMENT[@]}" --json --files "$file" </dev/null >"$S3EA_TMP/trust.txt" 2>&1 || true
  if [ "$(wc -l <"$S3EA_TMP/trust.txt" | tr -d ' ')" = 1 ] && grep -Eq "$accepted" "$S3EA_TMP/trust.txt"; then
    info "one accepted finding: MALFORMED, no Resource element (a trust policy has none; see iam/README.md)"
  else
    cat "$S3EA_TMP/trust.txt" >&2
    failed=1
  fi
done

if [ "$failed" = 0 ]; then
  step "IAM policies: $((${#identity[@]} + ${#trust[@]})) linted, 0 findings (1 accepted per trust policy)"
else
  die "parliament reported findings (above)"
fi
