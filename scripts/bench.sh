#!/usr/bin/env bash
# Measures the product on this machine and writes BENCHMARKS.md: bursts of S3 events
# through the release binaries on moto and the Storage Gateway stand-in (compared with
# the 2018 protocol and the physical limit), cold start, warm handler time, peak RSS,
# sizes, log bytes, minutes of sustained load (compared with modelled replays of the
# 2018 design and of the previous per-window refresher), and a soak with kills and faults.
#
# usage: scripts/bench.sh [--with-lambda-build] [--no-build] [--out FILE] [--only SECTIONS]
#                         [-- DRIVER-ARGS...]
#
#   --with-lambda-build  also build the arm64 Lambda packages as scripts/create-stack.sh does:
#                        `cargo lambda build --release --arm64 --output-format zip -p aggregator -p refresher`
#                        (needs cargo-lambda and the aarch64-unknown-linux-gnu target)
#   --no-build           use target/release/{aggregator,refresher} and target/debug/bench as they
#                        are (for iterating; a measured run should build)
#   --out FILE           where the report goes (default: BENCHMARKS.md)
#   --only SECTIONS      bursts, startup, sizes, logs, sustained, soak (comma-separated; default:
#                        all); `--only soak` into an existing report (e.g. the default
#                        BENCHMARKS.md) replaces only the soak section and its targets
#   DRIVER-ARGS          passed to the driver, e.g. `-- --scenario direct-10000x1x1`
#                        (`target/debug/bench --help` lists them)
#
# Uses the moto server at MOTO_ENDPOINT when it answers, and starts one otherwise.
# Safe to run again: every run rebuilds what changed, makes fresh tables, queues and
# buckets, and overwrites the report (but see --only soak). The harness's output goes to
# target/bench/driver.log.
set -euo pipefail
cd "$(dirname "$0")/.."

started_ms=$(date +%s%3N)
command_line="bash scripts/bench.sh${*:+ $*}"

usage() { sed -n '8,23p' "$0" | sed 's/^# \{0,1\}//'; }
with_lambda_build=false
build=true
out=BENCHMARKS.md
only=()
driver_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with-lambda-build) with_lambda_build=true ;;
    --no-build) build=false ;;
    --out)
      [ $# -ge 2 ] || { echo "error: --out needs a file name" >&2; exit 2; }
      out=$2
      shift
      ;;
    --only)
      [ $# -ge 2 ] || { echo "error: --only needs sections, e.g. --only sustained or --only soak" >&2; exit 2; }
      only=(--only "$2")
      shift
      ;;
    --) shift; driver_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

for tool in cargo python3 zip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not installed" >&2; exit 1; }
done

if $build; then
  echo "==> Building the release Lambda binaries (cargo build --release -p aggregator -p refresher)"
  cargo build --release -p aggregator -p refresher
else
  for name in aggregator refresher; do
    [ -x "target/release/$name" ] || { echo "error: --no-build, but target/release/$name is missing" >&2; exit 1; }
  done
  echo "==> Not building (--no-build): target/release/aggregator and target/release/refresher as they are"
fi

if $with_lambda_build; then
  if ! cargo lambda --version >/dev/null 2>&1; then
    echo "error: --with-lambda-build needs cargo-lambda: pip install cargo-lambda; rustup target add aarch64-unknown-linux-gnu" >&2
    exit 1
  fi
  echo "==> Building the arm64 Lambda packages (cargo lambda build --release --arm64 --output-format zip -p aggregator -p refresher)"
  cargo lambda build --release --arm64 --output-format zip -p aggregator -p refresher
fi

echo "==> Zipping the host release binaries as bootstrap.zip (zip -9) under target/bench/host-zip"
for name in aggregator refresher; do
  dir=target/bench/host-zip/$name
  mkdir -p "$dir"
  rm -f "$dir/bootstrap" "$dir/bootstrap.zip"
  cp "target/release/$name" "$dir/bootstrap"
  (cd "$dir" && zip -9 -q -X bootstrap.zip bootstrap)
done

if $build; then
  echo "==> Building the benchmark driver (cargo build -p integration-tests --bin bench)"
  cargo build -p integration-tests --bin bench
else
  [ -x target/debug/bench ] || { echo "error: --no-build, but target/debug/bench is missing" >&2; exit 1; }
fi

if [ -n "${MOTO_ENDPOINT:-}" ] && python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/moto-api/', timeout=2)" "$MOTO_ENDPOINT" 2>/dev/null; then
  echo "==> Using the moto server at $MOTO_ENDPOINT"
else
  command -v moto_server >/dev/null 2>&1 || scripts/install-deps.sh
  # shellcheck source=scripts/moto.sh
  . scripts/moto.sh
  MOTO_LOG=target/bench/moto.log start_moto
fi

log=target/bench/driver.log
args=(--out "$out" "${only[@]}" "${driver_args[@]}")
echo "==> Running the benchmark: S3EA_BIN_DIR=target/release target/debug/bench ${args[*]} (harness output: $log)"
S3EA_BIN_DIR=target/release \
  BENCH_COMMAND="$command_line" \
  BENCH_STARTED_MS="$started_ms" \
  target/debug/bench "${args[@]}" 2>"$log" || {
    echo "error: the benchmark failed; the last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  }

elapsed_s=$(( ($(date +%s%3N) - started_ms) / 1000 ))
echo "==> Done in $((elapsed_s / 60)) min $((elapsed_s % 60)) s: $out"
