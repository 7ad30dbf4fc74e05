import os
import sys
from pathlib import Path

import pytest
import torch

# The repository root holds kernels/ and passes/, installed as fxquant.kernels and fxquant.passes.
# On sys.path (`python -m pytest` puts the working directory there) kernels/ would shadow the PyPI
# package `kernels` that transformers >= 5.25 imports; the tests import the installed fxquant.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers share the cores: each takes its share of them, so that workers do not
# oversubscribe the CPU (PYTEST_XDIST_WORKER_COUNT is set in each worker).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M (fp32)."""
    from fxquant.real_models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_windows(smollm2):
    """Calibration windows (8 x 128 tokens) and held-out eval windows (4 x 256) as input_ids [1, L]."""
    from fxquant.real_models import text_corpus, token_windows

    _, tok = smollm2
    return (token_windows(tok, text_corpus("calib"), 8, 128), token_windows(tok, text_corpus("eval"), 4, 256))


@pytest.fixture(scope="session")
def smollm2_graph(smollm2, smollm2_windows):
    """SmolLM2 captured once (fxquant.capture), for tests that quantize it many ways: a captured graph
    is a model to quantize or calibrate, and a checkpoint saved from it carries the model's names."""
    import fxquant

    return fxquant.capture(smollm2[0], (smollm2_windows[0][0][:, :64],))


@pytest.fixture(scope="session")
def minilm():
    from fxquant.real_models import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def digits():
    from digits import digits_split

    return digits_split()
