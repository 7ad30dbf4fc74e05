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


def main() -> None:
    import logging

    import onnxruntime as ort
    import torch

    from fxquant import Calibrator, QuantConfig
    from fxquant.onnx_reference import ascend_reference_session
    from fxquant.real_models import load_minilm, sentences, text_corpus

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
    calib = [{k: v for k, v in st.tokenize(sents[i:i + 8]).items() if isinstance(v, torch.Tensor)}
             for i in range(0, 64, 8)]
    cal = Calibrator(bert, QuantConfig(mm_tensor=False, disable_names=[]), calib_data=calib)
    cal.run()
    ev = {k: v for k, v in st.tokenize(sentences(text_corpus("eval"), 16)).items() if isinstance(v, torch.Tensor)}
    mask = ev["attention_mask"].bool().numpy()
    with torch.no_grad():
        ref, fp = cal.model(**ev).last_hidden_state.numpy(), bert(**ev).last_hidden_state.numpy()
    qdq = ort.InferenceSession(str(cal.export_quant_onnx("minilm", out_dir)), providers=["CPUExecutionProvider"])
    out = qdq.run(None, {k: v.numpy() for k, v in ev.items()})[0]
    rows.append(_row("MiniLM-L6 (real tokens)", "QDQ / onnxruntime", out[mask], ref[mask], fp[mask]))
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


if __name__ == "__main__":
    main()
