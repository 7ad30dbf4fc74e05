#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the whole test suite on real models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # scripts, not the library, keep Hugging Face offline
ruff check fxquant passes kernels tests benchmarks examples
python -m pytest -q -p no:cacheprovider "$@"
