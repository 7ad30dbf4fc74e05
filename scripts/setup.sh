#!/usr/bin/env bash
# Create .venv (if missing) and install fxquant with real-model, onnxruntime and test extras.
# torch is pinned to 2.13.0 first: on this CPU machine that wheel is local, and an unpinned
# torch requirement would otherwise pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[models,onnxruntime,test]"
python -c "import torch, fxquant; print('fxquant', fxquant.__version__, 'torch', torch.__version__)"
