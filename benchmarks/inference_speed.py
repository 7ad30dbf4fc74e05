"""Inference speed and size of frozen quantized models against fp32, in one run (ratios).

Prints the CPU capability and the kernel each scheme runs, then:
  1. GEMM table: SmolLM2's layer 5 gate_proj (576 -> 1536) on its inputs from held-out text, at
     M = 1, 32, 512, 2048 rows, per scheme, eager and compiled (backend="fxquant"), against fp32
     F.linear;
  2. SmolLM2-135M prefill (1 x 512, 8 x 128): fp32 eager / inductor, each W8A8 scheme (lm_head
     float, and quantized: "+lm_head") eager, compiled with backend="fxquant" and reloaded from its
     Ascend checkpoint (eager), with its perplexity;
  3. SmolLM2 decode with a KV cache (greedy, 128 new tokens): fp32 eager and inductor, w8a16 /
     w4a16 / w8a16 with an int8 lm_head by default (any scheme with --decode: w8a8_dynamic, w8a8
     calibrated as in 2.), eager and compiled, compiled also with
     fxquant.skip_frozen_layer_guards as guard_filter_fn, and reloaded from its Ascend checkpoint
     (eager), each timed in rounds interleaved with fp32 eager (compilation of a whole decoder takes minutes on 2 cores: the warm-up column);
  4. perplexity of each W8A8 scheme on GPL-3 (4 x 512): eager grad / eager no_grad / compiled /
     Ascend checkpoint reload / the float model compiled with fxquant.quantizing_backend;
  5. parameter + buffer bytes (unique storages) per scheme;
  6. MiniLM (w8a8_dynamic, 32 x 128) against fp32, and CNNs (w8a8: the digits ResNet- and
     MobileNet-style CNNs, a ResNet-18-sized one on 224 x 224 images) against fp32.

    python benchmarks/inference_speed.py [--skip decode minilm cnn] [--repeat 3] [--prefill w8a8_dynamic w8a8+lm_head] [--decode w8a16 w4a16] [--decode-eager-only]

Emulate an AVX2-only CPU on a VNNI machine with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 and
a TORCHINDUCTOR_CACHE_DIR of its own (inductor's cache does not key on ATEN_CPU_CAPABILITY).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _ascend import ascend_reload

import fxquant
from fxquant.kernels import default_kernel
from fxquant.kernels.int8_decode import int8_decode_available
from fxquant.kernels.int_matmul import cpu_has_int8_dot
from fxquant.kernels.weight_only import native_gemv_available
from fxquant.real_models import (
    license_text,
    load_minilm,
    load_smollm2,
    perplexity,
    text_corpus,
    token_windows,
)
from fxquant.resources import storage_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

W8A8_SCHEMES = ("w8a8_dynamic", "w8a8")
GROUP = fxquant.SchemeOptions(group_size=64)  # 128 does not divide SmolLM2's 576
#: static W8A8 rounds x / s + offset in one step, as the Ascend checkpoint it is reloaded from does
ASCEND_ROUNDING = fxquant.SchemeOptions(offset_in_rounding=True)


def seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of fn() over `repeat` runs after one warm-up, without autograd."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """{name: (median seconds, median speed-up over the first fn)}: after one warm-up each, the
    fns run in turn `repeat` times and each round's times are divided by the first fn's time of
    the same round, so that the CPU's drift between minutes (up to 20% on shared machines) cancels
    in the ratios."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeat):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = times[next(iter(fns))]
    return {name: (statistics.median(t), statistics.median(b / x for b, x in zip(base, t)))
            for name, t in times.items()}


def compiled(module: torch.nn.Module, backend: str = "fxquant") -> torch.nn.Module:
    return torch.compile(module, backend=backend, dynamic=False)


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")


def quantize_smollm2(model, tok, scheme: str, calib: list[torch.Tensor], lm_head: bool = False,
                     inplace: bool = False):
    """SmolLM2 quantized as the tables use it; lm_head float unless `lm_head`; `inplace`: the
    layers installed into `model` (it keeps generate())."""
    if scheme == "w8a8":
        return fxquant.quantize(model, [[w] for w in calib], scheme="w8a8", progress=False, smooth_alpha=0.5,
                                options=ASCEND_ROUNDING, disable_last_layer=not lm_head, inplace=inplace)
    return fxquant.quantize(model, scheme=scheme, example_inputs=[calib[0]], progress=False, options=GROUP,
                            disable_last_layer=not lm_head, inplace=inplace)


def quantizing_backend_for(scheme: str, calib: list[torch.Tensor]) -> fxquant.compiler.QuantizingBackend:
    """fxquant.quantizing_backend with quantize_smollm2's settings (calibration as the model is called)."""
    data = [{"input_ids": w, "use_cache": False} for w in calib]
    if scheme == "w8a8":
        return fxquant.quantizing_backend("w8a8", calib_data=data, smooth_alpha=0.5, options=ASCEND_ROUNDING)
    return fxquant.quantizing_backend(scheme, calib_data=data[:1], options=GROUP)


def layer_inputs(model, layer_name: str, ids: torch.Tensor) -> torch.Tensor:
    """The inputs [tokens, k] that `layer_name` of `model` sees when it reads `ids` [b, t]."""
    seen = []
    handle = model.get_submodule(layer_name).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen[0]


def gemm_table(model, tok, repeat: int) -> None:
    """One real layer (SmolLM2 layer 5 gate_proj, 576 -> 1536) on its real inputs from held-out text:
    the onednn_split kernel's cost depends on how many codes pass 7 bits, so random inputs would
    misstate it."""
    name = "model.layers.5.mlp.gate_proj"
    lin = model.get_submodule(name)
    inputs = torch.cat([layer_inputs(model, name, w) for w in token_windows(tok, text_corpus("eval"), 4, 512)])
    calib = [[layer_inputs(model, name, w)] for w in token_windows(tok, text_corpus("calib"), 2, 512)]
    layers = {s: fxquant.quantize(torch.nn.Sequential(copy.deepcopy(lin)), calib, scheme=s, disable_last_layer=False,
                                  progress=False, options=GROUP).get_submodule("0")
              for s in ("w8a8_dynamic", "w8a8", "w8a16", "w4a16")}
    rows = []
    for m in (1, 32, 512, 2048):
        x = inputs[:m]
        base = seconds(lambda x=x: F.linear(x, lin.weight, lin.bias), repeat * 5)
        row: list[object] = [m, base * 1e3]
        for layer in layers.values():
            eager = seconds(lambda x=x, layer=layer: layer(x), repeat * 5)
            torch._dynamo.reset()
            fast = compiled(layer)
            comp = seconds(lambda x=x, fast=fast: fast(x), repeat * 5)
            row += [base / eager, base / comp]
        rows.append(row)
    header = ["M", "fp32 ms"] + [f"{s} {mode}" for s in layers for mode in ("eager", "compiled")]
    table(f"GEMM {name} (576 -> 1536) on its inputs from held-out text: speed-up over fp32 F.linear "
          "(higher is faster)", header, rows)
    print("\nkernels: " + ", ".join(f"{s}: {layer.kernel}" for s, layer in layers.items()))


def prefill_table(model, tok, calib, repeat: int, configs: list[str]) -> dict[str, torch.nn.Module]:
    """Prefill of random token ids with all logits; configs are "<scheme>" (lm_head float) or
    "<scheme>+lm_head". The perplexity column (GPL-3, 4 x 512, eager no_grad) states what each
    configuration costs in accuracy."""
    shapes = {"1x512": torch.randint(0, 40000, (1, 512)), "8x128": torch.randint(0, 40000, (8, 128))}
    windows = token_windows(tok, license_text("GPL-3"), 4, 512)
    models = {"fp32": model}
    for config in configs:
        scheme, _, head = config.partition("+")
        models[config] = quantize_smollm2(model, tok, scheme, calib, lm_head=head == "lm_head")
    reloaded = {f"{config} Ascend": ascend_reload(model, models[config], config.partition("+")[0]) for config in configs}
    ppl = {name: perplexity(m, windows) for name, m in {**models, **reloaded}.items()}
    rows = []
    for shape, ids in shapes.items():
        def run(m, ids=ids):
            return lambda: m(input_ids=ids, use_cache=False)
        torch._dynamo.reset()
        fns = {"fp32 eager": run(model), "fp32 inductor": run(compiled(model, "inductor"))}
        for name in configs:
            fns[f"{name} eager"] = run(models[name])
            fns[f"{name} fxquant"] = run(compiled(models[name]))
            fns[f"{name} Ascend reload"] = run(reloaded[f"{name} Ascend"])
        timed = interleaved(fns, repeat)
        inductor_ratio = timed["fp32 inductor"][1]
        for name, (t, ratio) in timed.items():
            config = name.rpartition(" ")[0]
            rows.append([shape, name, t * 1e3, ratio, ratio / inductor_ratio, ppl.get(config, ppl["fp32"])])
    table(f"SmolLM2 prefill (all logits; median of {repeat} interleaved rounds); lm_head float unless +lm_head",
          ["shape", "model", "ms", "vs fp32 eager", "vs fp32 inductor", "perplexity GPL-3 4x512"], rows)
    return models


#: the decode rows compiled with fxquant.skip_frozen_layer_guards as torch.compile's guard_filter_fn
FILTERED = "fxquant, frozen-layer guards skipped"


def decode_table(model, tok, calib: list[torch.Tensor], new_tokens: int, configs: list[str], repeat: int,
                 compiled_too: bool = True) -> None:
    """Greedy decode with a KV cache; configs are "<scheme>" (lm_head float) or "<scheme>+lm_head".
    Each model runs eager and (compiled_too) compiled; warm-up is the first generate() (8 tokens:
    compilation). Each model's generate() of new_tokens runs `repeat` rounds interleaved with the
    fp32 eager model's: the speed-up is the median of the rounds' ratios (the CPU's drift between
    minutes cancels), ms / token the median of the model's rounds."""
    prompt = tok("The GNU General Public License is a free, copyleft license for", return_tensors="pt")
    tokens: dict[str, torch.Tensor] = {}

    def generate(m, name: str, n: int = new_tokens) -> None:
        tokens[name] = m.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def row(m, name: str, eager_name: str | None = None) -> list[object]:
        """The table row of model m; eager_name: the row whose tokens a compiled m must give."""
        with torch.no_grad():
            start = time.perf_counter()
            generate(m, name, 8)
            warm = time.perf_counter() - start
        timed = interleaved({"fp32 eager": partial(generate, model, "fp32 eager"), name: partial(generate, m, name)},
                            repeat)
        if eager_name is None:
            return [name, timed[name][0] / new_tokens * 1e3, timed[name][1], "-", "-"]
        same = str(torch.equal(tokens[eager_name], tokens[name]))
        return [name, timed[name][0] / new_tokens * 1e3, timed[name][1], warm, same]

    def compile_forward(m, backend: str, guard_filter=None):
        torch._dynamo.reset()
        options = {"guard_filter_fn": guard_filter} if guard_filter else None
        m.forward = torch.compile(m.forward, backend=backend, dynamic=True, options=options)
        return m

    rows = [["fp32 eager", seconds(partial(generate, model, "fp32 eager"), repeat) / new_tokens * 1e3, 1.0, "-", "-"]]
    if compiled_too:
        rows.append(row(compile_forward(copy.deepcopy(model), "inductor"), "fp32 inductor", "fp32 eager"))
    for config in configs:
        scheme, _, head = config.partition("+")
        for mode in ("eager", "fxquant", FILTERED) if compiled_too else ("eager",):
            small = quantize_smollm2(copy.deepcopy(model), tok, scheme, calib, lm_head=head == "lm_head", inplace=True)
            if mode != "eager":
                compile_forward(small, "fxquant", fxquant.skip_frozen_layer_guards if mode == FILTERED else None)
            rows.append(row(small, f"{config} {mode}", None if mode == "eager" else f"{config} eager"))
            del small
        reloaded = ascend_reload(model, quantize_smollm2(model, tok, scheme, calib, lm_head=head == "lm_head"), scheme)
        rows.append(row(reloaded, f"{config} Ascend reload", f"{config} eager"))
        del reloaded
    table(f"SmolLM2 decode, KV cache, {new_tokens} new tokens (greedy), {repeat} rounds interleaved with fp32 eager",
          ["model", "ms / token", "vs fp32 eager", "warm-up s", "tokens = eager tokens"], rows)


def perplexity_table(model, tok, calib) -> None:
    windows = token_windows(tok, license_text("GPL-3"), 4, 512)
    fp32 = perplexity(model, windows)
    rows = [["fp32", fp32, "-"]]
    for scheme in W8A8_SCHEMES:
        q = quantize_smollm2(model, tok, scheme, calib)
        eager = perplexity(q, windows)
        grad = perplexity(q, windows, grad=True)
        torch._dynamo.reset()
        comp = perplexity(compiled(q), windows)
        ascend = perplexity(ascend_reload(model, q, scheme), windows)
        torch._dynamo.reset()
        backend = quantizing_backend_for(scheme, calib)
        by_backend = perplexity(torch.compile(model, backend=backend), windows)
        values = {"eager no_grad": eager, "eager grad": grad, "compiled": comp, "Ascend reload": ascend,
                  "torch.compile(float, quantizing_backend)": by_backend}
        spread = (max(values.values()) - min(values.values())) / min(values.values())
        for k, v in values.items():
            rows.append([f"{scheme} {k}", v, f"{100 * spread:.3f}%"])
        torch._dynamo.reset()
    table("SmolLM2 perplexity on GPL-3, 4 x 512 tokens", ["model", "perplexity", "spread of the 5 paths"], rows)


def size_table(model, models: dict[str, torch.nn.Module], tok, calib) -> None:
    base = storage_bytes(model)
    rows = [["fp32", base / 2**20, 1.0]]
    for scheme in ("w8a8_dynamic", "w8a8", "w8a16", "w4a16"):
        q = models.get(scheme) or quantize_smollm2(model, tok, scheme, calib)
        rows.append([scheme, storage_bytes(q) / 2**20, storage_bytes(q) / base])
    table("SmolLM2 parameter + buffer bytes (unique storages; tied embedding and float lm_head included)",
          ["model", "MiB", "vs fp32"], rows)


def minilm_table(repeat: int) -> None:
    from fxquant.real_models import encoder_inputs, sentences

    encoder = load_minilm()
    bert = encoder[0].auto_model.eval()
    texts = sentences(text_corpus("eval"), 32)
    batch = encoder_inputs(encoder, texts)
    batch = {k: F.pad(v, (0, 128 - v.shape[1]))[:, :128] for k, v in batch.items()}
    q = fxquant.quantize(bert, example_inputs=batch, scheme="w8a8_dynamic", progress=False)
    base = seconds(lambda: bert(**batch), repeat)
    rows = [["fp32 eager", base * 1e3, 1.0]]
    for name, module in (("fp32 inductor", None), ("w8a8_dynamic eager", q), ("w8a8_dynamic fxquant", None)):
        torch._dynamo.reset()
        if module is None:
            module = compiled(bert, "inductor") if name.startswith("fp32") else compiled(q)
        t = seconds(lambda m=module: m(**batch), repeat)
        rows.append([name, t * 1e3, base / t])
    table("MiniLM-L6 encoder, batch 32 x 128", ["model", "ms", "vs fp32 eager"], rows)


def cnn_table(repeat: int) -> None:
    """The digits CNNs (trained for seconds; top-1 accuracy on the held-out digits) and a CNN with
    ResNet-18's widths and depth (no stem downsampling) on 224 x 224 inputs (random weights: speed
    only), w8a8, against fp32 eager (as given, and in channels-last memory) in interleaved rounds;
    the convolution kernel each quantized model runs."""
    from digits import accuracy, digits_split, train
    from models import MobileNetStyle, ResNetStyle, resnet18_sized

    x_train, y_train, x_test, y_test = digits_split()
    digits_calib = [[x_train[i:i + 64]] for i in range(0, 256, 64)]
    cases = [(f"digits {build.__name__}, batch 256", train(build(), x_train, y_train), digits_calib, x_test[:256],
              repeat * 10) for build in (ResNetStyle, MobileNetStyle)]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(3)]
    cases.append(("ResNet-18 widths, 4 x 3 x 224 x 224 (random weights)", resnet18_sized().eval(),
                  [[x] for x in images[:2]], images[2], repeat))
    rows = []
    for name, net, calib, x, rounds in cases:
        q = fxquant.quantize(net, calib, scheme="w8a8", progress=False)
        kernels = sorted({m.kernel for m in q.modules() if len(getattr(m, "weight_shape", ())) > 2})
        torch._dynamo.reset()
        fp32_inductor, fast = compiled(net, "inductor"), compiled(q)
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        r = interleaved({"fp32": partial(net, x), "fp32 cl": partial(net_cl, x_cl), "inductor": partial(fp32_inductor, x),
                         "eager": partial(q, x), "fxquant": partial(fast, x)}, rounds)
        with torch.no_grad():
            top1 = (f"{accuracy(net, x_test, y_test):.1f} / {accuracy(q, x_test, y_test):.1f}"
                    if name.startswith("digits") else "-")
        rows.append([name, ", ".join(kernels), r["fp32"][0] * 1e3, r["fp32 cl"][1], r["inductor"][1], r["eager"][1],
                     r["fxquant"][1], top1])
    table("CNNs, w8a8: speed-up over fp32 eager (median of interleaved rounds)",
          ["model", "conv kernel", "fp32 eager ms", "fp32 eager channels-last", "fp32 inductor", "w8a8 eager",
           "w8a8 backend=fxquant", "top-1 % fp32 / w8a8"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["gemm", "prefill", "decode", "ppl", "size", "minilm", "cnn"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-eager-only", action="store_true",
                    help="decode table without compiled models (compiling a decoder takes minutes)")
    ap.add_argument("--prefill", nargs="*", default=["w8a8_dynamic", "w8a8", "w8a8_dynamic+lm_head", "w8a8+lm_head"],
                    help="prefill configs: <scheme> (lm_head float) or <scheme>+lm_head (lm_head quantized too)")
    ap.add_argument("--decode", nargs="*", default=["w8a16", "w4a16", "w8a16+lm_head"],
                    help="decode configs: <scheme> (lm_head float) or <scheme>+lm_head (lm_head quantized too)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"int8 dot products (VNNI/AMX): {cpu_has_int8_dot()}, threads {torch.get_num_threads()}")
    gemv = "C kernel" if native_gemv_available() else "torch ops (no C compiler)"
    int8_decode = "C kernel" if int8_decode_available() else "as more rows (no C compiler)"
    print(f"W8A8 integer kernel: {default_kernel(cpu)}, up to 8 rows eager: {int8_decode}; weight-only: dequant_mm, "
          f"up to 8 rows a GEMV over the codes (eager: {gemv}; compiled: fused by inductor)")
    model, tok = load_smollm2()
    calib = token_windows(tok, text_corpus("calib"), 4, 512)
    if "gemm" not in args.skip:
        gemm_table(model, tok, args.repeat)
    models: dict[str, torch.nn.Module] = {}
    if "prefill" not in args.skip:
        models = prefill_table(model, tok, calib, args.repeat, args.prefill)
    if "decode" not in args.skip:
        decode_table(model, tok, calib, args.new_tokens, args.decode, args.repeat,
                     compiled_too=not args.decode_eager_only)
    if "ppl" not in args.skip:
        perplexity_table(model, tok, calib)
    if "size" not in args.skip:
        size_table(model, models, tok, calib)
    if "minilm" not in args.skip:
        minilm_table(args.repeat)
    if "cnn" not in args.skip:
        cnn_table(args.repeat)


if __name__ == "__main__":
    main()
