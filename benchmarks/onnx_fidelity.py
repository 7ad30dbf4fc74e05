"""How closely the exported ONNX reproduces the fxquant fake-quant model: the QDQ file in
onnxruntime and the Ascend file in fxquant's reference evaluator, for the digits CNNs and MiniLM.

    python benchmarks/onnx_fidelity.py

"within one step" counts output elements whose difference from the fake-quant output is at most
one int8 step of the output's range ((max - min) / 255). The last row is a baseline: the fake-quant
model against itself after a float-rounding-sized perturbation (1e-6 relative) of its embedding
table, which shows how far static int8 activations carry such differences through six layers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _row(name: str, target: str, out, ref, fp) -> str:
    import numpy as np

    d = np.abs(out - ref)
    step = (ref.max() - ref.min()) / 255.0
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    cos = lambda a, b: float(np.mean((flat(a) * flat(b)).sum(1) / (np.linalg.norm(flat(a), axis=1)  # noqa: E731
                                                                    * np.linalg.norm(flat(b), axis=1))))
    return (f"| {name} | {target} | {d.max():.4f} | {100 * (d <= step).mean():.2f}% | {cos(out, ref):.5f} | "
            f"{cos(out, fp):.5f} | {cos(ref, fp):.5f} |")


def _scope_module(node) -> str:
    """The module path of an exported node, from torch.onnx's name-scope metadata."""
    import re

    scopes = {m.key: m.value for m in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
    parts = re.findall(r"'((?:[^'\\]|\\.)*)'|\"([^\"]*)\"", scopes)
    names = [a or b for a, b in parts]
    if len(names) < 2:
        return ""
    path = names[1]
    while "getattr(" in path:
        path = re.sub(r"getattr\(L\['self'\]\.([\w.]+), '(\w+)'\)", r"\1.\2", path)
    return path.replace("L['self'].", "")


def per_layer_fidelity(proto, feeds: dict, fake_quant_model) -> tuple[float, int]:
    """Teacher-forced check: every quantized MatMul of the QDQ file gets onnxruntime's own input;
    the fake-quant layer of the same module path runs on that input. Returns (fraction of layer
    outputs within one int8 step of the onnxruntime output's range, number of layers)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    modules = dict(fake_quant_model.named_modules())
    pairs = {}
    for n in proto.graph.node:
        name = _scope_module(n)
        if n.op_type != "MatMul" or type(modules.get(name)).__name__ != "QLinear":
            continue
        dq = producer.get(n.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        after = consumers.get(n.output[0], [])
        out = after[0].output[0] if len(after) == 1 and after[0].op_type == "Add" else n.output[0]
        pairs[name] = (q.input[0], out)
    model = onnx.ModelProto.FromString(proto.SerializeToString())
    wanted = sorted({t for pair in pairs.values() for t in pair} - {o.name for o in model.graph.output})
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feeds)))
    inside = total = 0
    with torch.no_grad():
        for name, (x, y) in pairs.items():
            ours = modules[name](torch.from_numpy(values[x])).numpy()
            ref = values[y]
            step = (ref.max() - ref.min()) / 255.0
            inside += int((np.abs(ours - ref) <= step).sum())
            total += ref.size
    return inside / max(total, 1), len(pairs)


def main() -> None:
    import logging

    import onnxruntime as ort
    import torch

    from fxquant import Calibrator, QuantConfig
    from fxquant.formats.onnx_reference import ascend_reference_session
    from fxquant.real_models import (
        encoder_batches,
        encoder_inputs,
        load_minilm,
        sentences,
        text_corpus,
    )

    from digits import digits_split, train
    from models import MobileNetStyle, ResNetStyle

    logging.disable(logging.WARNING)
    out_dir = Path(tempfile.mkdtemp(prefix="fxquant_fidelity_"))
    rows = []
    xtr, ytr, xte, _ = digits_split()
    for cls in (ResNetStyle, MobileNetStyle):
        torch.manual_seed(0)
        model = train(cls(), xtr, ytr)
        cal = Calibrator(model, QuantConfig(), calib_data=[[xtr[i:i + 64]] for i in range(0, 256, 64)])
        cal.run()
        x = xte.numpy()
        with torch.no_grad():
            ref, fp = cal.model(xte).numpy(), model(xte).numpy()
        qdq = ort.InferenceSession(str(cal.export_quant_onnx(cls.__name__, out_dir, ["x"])),
                                   providers=["CPUExecutionProvider"])
        rows.append(_row(cls.__name__, "QDQ / onnxruntime", qdq.run(None, {"x": x})[0], ref, fp))
        asc = ascend_reference_session(str(cal.export_quant_onnx(cls.__name__, out_dir, ["x"], target="ascend")))
        rows.append(_row(cls.__name__, "Ascend / reference", asc.run(None, {"x": x})[0], ref, fp))

    st = load_minilm()
    bert = st[0].model
    sents = sentences(text_corpus("calib"), 64)
    calib = encoder_batches(st, sents)
    cal = Calibrator(bert, QuantConfig(mm_tensor=False, disable_names=[]), calib_data=calib)
    cal.run()
    ev = encoder_inputs(st, sentences(text_corpus("eval"), 16))
    mask = ev["attention_mask"].bool().numpy()
    with torch.no_grad():
        ref, fp = cal.model(**ev).last_hidden_state.numpy(), bert(**ev).last_hidden_state.numpy()
    qdq = ort.InferenceSession(str(cal.export_quant_onnx("minilm", out_dir)), providers=["CPUExecutionProvider"])
    out = qdq.run(None, {k: v.numpy() for k, v in ev.items()})[0]
    rows.append(_row("MiniLM-L6 (real tokens)", "QDQ / onnxruntime", out[mask], ref[mask], fp[mask]))
    import onnx

    frac, n_layers = per_layer_fidelity(onnx.load(out_dir / "minilm.onnx"), {k: v.numpy() for k, v in ev.items()},
                                        cal.model)
    layer_note = (f"MiniLM-L6, each of its {n_layers} quantized Linear layers run on onnxruntime's own input: "
                  f"{100 * frac:.2f}% of layer outputs within one step")
    # baseline: the fake-quant model against itself with its embedding table perturbed by 1e-6
    # (relative), the size of the fp32 differences between onnxruntime and torch kernels
    table = dict(cal.model.named_parameters())["embeddings.word_embeddings.weight"]
    saved = table.detach().clone()
    with torch.no_grad():
        table.mul_(1 + 1e-6 * torch.randn(table.shape, generator=torch.Generator().manual_seed(0)))
        perturbed = cal.model(**ev).last_hidden_state.numpy()
        table.copy_(saved)
    rows.append(_row("MiniLM-L6 (real tokens)", "fake-quant, embeddings x (1 + 1e-6 noise)", perturbed[mask],
                     ref[mask], fp[mask]))

    print("exported ONNX vs the fxquant fake-quant model (W8A8, static per-tensor activations)")
    print("| model | file / runtime | max abs diff | within one step | cos(ONNX, fake-quant) | "
          "cos(ONNX, fp32) | cos(fake-quant, fp32) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(layer_note)


if __name__ == "__main__":
    main()
