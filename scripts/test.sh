#!/usr/bin/env bash
# Runs every test: the unit tests of shared/, and the integration tests that drive
# the compiled Lambda binaries against one moto server and the Storage Gateway stand-in.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "==> Building the Lambda binaries and the test binaries (debug profile)"
cargo build --workspace --bins
cargo test --workspace --no-run

# shellcheck source=scripts/moto.sh
. scripts/moto.sh
start_moto

echo "==> Running the tests"
cargo test --workspace "$@"
