#!/usr/bin/env bash
# The local demo: moto plus the Storage Gateway stand-in, two buckets with file shares,
# a few hundred real S3 events through the aggregator, then the refresher, and a report.
# No AWS account is used; everything runs on loopback and stops when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "==> Building the aggregator, the refresher and the demo driver"
cargo build --workspace --bins
echo "==> Running the demo"
target/debug/demo
