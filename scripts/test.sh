#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the whole test suite on real models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report is checked in a real browser: Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the report test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is missing and cannot be installed here (not root): the report test will fail" >&2
  fi
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # scripts, not the library, keep Hugging Face offline
ruff check fxquant passes kernels tests benchmarks examples
# two workers (pytest-xdist), one file each at a time: capture and calibration are largely
# single-threaded Python, so two processes of one torch thread each use both cores
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@"
