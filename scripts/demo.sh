#!/usr/bin/env bash
# The local demo: moto plus the Storage Gateway stand-in, two buckets with file shares,
# a few hundred real S3 events through the aggregator, then the refresher, and a report.
# No AWS account is used; everything runs on loopback and stops when the demo ends.
# The functions' stdout and stderr (their EMF metrics and logs) go to a log file,
# .demo/functions.log unless --log-file names another; --verbose also shows them here.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 [--verbose] [--log-file PATH]"; }
demo_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -v|--verbose) demo_args+=(--verbose); shift ;;
    --log-file)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      demo_args+=(--log-file "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh
echo "==> Building the aggregator, the refresher and the demo driver"
cargo build --workspace --bins
echo "==> Running the demo"
target/debug/demo "${demo_args[@]}"
