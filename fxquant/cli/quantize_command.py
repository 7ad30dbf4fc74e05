"""`fxquant quantize MODEL --calib FILE --out DIR`: quantize a causal LM and write a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .calib_text import TEXT_FORMATS, text_windows
from .errors import UsageError
from .model_source import DTYPES, resolve_model, save_tokenizer, write_source

log = logging.getLogger(__name__)

FORMATS = ("ascend", "onnx")
#: default schemes QDQ ONNX can hold (static int8 activations, or int8 weights only)
ONNX_SCHEMES = ("w8a8", "w8a16")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("quantize", parents=parents, help="quantize a causal LM and write an Ascend or ONNX checkpoint",
                       description="Quantize MODEL (a Hugging Face folder, a .gguf file or a shipped model "
                                   "name) on calibration text and write the result to DIR.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--scheme", default="w8a8_dynamic", help="default scheme (default: w8a8_dynamic)")
    p.add_argument("--calib", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--calib-format", choices=TEXT_FORMATS, default="windows",
                   help="windows: the text cut into --samples windows of --seq-len tokens; lines: one document per line")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", choices=FORMATS, default="ascend")
    p.add_argument("--mix-cfg", metavar="JSON", help="{layer name or pattern: scheme}, inline or a file")
    p.add_argument("--disable-level", default="L0", metavar="L<n>",
                   help="roll back the n layers whose quantization hurts most (msModelSlim's disable_level)")
    p.add_argument("--session", metavar="YAML", help="a quantization session (seed 002 processors) in YAML")
    p.add_argument("--group-size", type=int, default=64, help="group size of w4a16 (default 64)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="load and quantize the model in this dtype; the Ascend checkpoint keeps its float "
                        "tensors and scales in it (default float32)")
    p.add_argument("--report", metavar="HTML", help="also write the HTML report of the result")
    p.set_defaults(run=run)


class CausalLMLogits(torch.nn.Module):
    """input_ids int64 [b, s] -> logits [b, s, vocab] of a causal LM called without a KV cache
    (what the ONNX file computes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _mix_cfg(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--mix-cfg is neither a JSON object nor a JSON file: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--mix-cfg must be a JSON object {{layer name or pattern: scheme}}, got {type(data).__name__}")
    return data


def _session(path: str | None):
    if path is None:
        return None
    from fxquant.session import session_from_dict

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"session file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"session file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return session_from_dict(data)


def writable_folder(path: str) -> Path:
    """Create `path` if needed and prove a file can be written there (UsageError otherwise)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fxquant-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {path!r}: {exc.strerror or exc}") from None
    return folder


def _check_options(args: argparse.Namespace) -> None:
    from fxquant.calibrator.quant_config import parse_disable_level
    from fxquant.schemes import make_scheme

    make_scheme(args.scheme)  # ConfigError lists the valid schemes
    parse_disable_level(args.disable_level)
    if args.session and (args.mix_cfg or args.disable_level != "L0"):
        raise UsageError("--session sets the processors itself: leave out --mix-cfg and --disable-level")
    if args.format == "onnx" and args.session:
        raise UsageError("--session writes the Ascend format; leave out --format onnx")
    if args.format == "onnx" and args.dtype != "float32":
        raise UsageError(f"--format onnx exports float32 models; leave out --dtype {args.dtype}, or use --format ascend")
    if args.format == "onnx" and args.scheme not in ONNX_SCHEMES:
        raise UsageError(f"--format onnx writes QDQ ONNX, which holds static activations or weight-only int8: "
                         f"use --scheme {' or '.join(ONNX_SCHEMES)}, or --format ascend for {args.scheme}")


def run(args: argparse.Namespace) -> int:
    import fxquant

    _check_options(args)
    source = resolve_model(args.model)
    mix_cfg, session = _mix_cfg(args.mix_cfg), _session(args.session)
    out = writable_folder(args.out)
    if args.report:
        writable_folder(str(Path(args.report).resolve().parent))
    start = time.perf_counter()
    model, tok = source.load(args.dtype)
    windows = text_windows(tok, args.calib, args.seq_len, args.samples, args.calib_format)
    calib = [{"input_ids": w, "use_cache": False} for w in windows]
    log.info("loaded %s in %.1f s; %d calibration windows", args.model, time.perf_counter() - start, len(calib))
    start = time.perf_counter()
    gm, scheme, measured = _quantize(fxquant, model, calib, args, mix_cfg, session)
    seconds = time.perf_counter() - start
    files = _write(gm, model, tok, out, args, scheme, calib)
    write_source(out, source, {"scheme": scheme, "format": args.format, "dtype": args.dtype,
                               "calib": str(Path(args.calib).resolve()), "seq_len": args.seq_len,
                               "samples": len(calib)})
    if args.report:
        fxquant.report(gm, None if measured else calib, args.report, title=f"fxquant: {args.model} {scheme}")
    n_q = sum(isinstance(m, fxquant.QuantOpr) for m in gm.modules())
    log.info("quantized %d layers as %s in %.1f s", n_q, scheme, seconds)
    print(f"quantized {n_q} layers ({scheme}) in {seconds:.1f} s; wrote {out}: {', '.join(files)}"
          + (f"; report {args.report}" if args.report else ""))
    return 0


def _quantize(fxquant: Any, model: Any, calib: list, args: argparse.Namespace, mix_cfg: dict | None,
              session: Any) -> tuple[Any, str, bool]:
    """(quantized GraphModule, default scheme, whether layer errors were recorded)."""
    if session is not None:
        from fxquant.session import SaveProcessorConfig
        from fxquant.session import run as run_session

        procs = dict(session.processor_cfg_map)
        save = procs.get("save")
        if save is not None and Path(save.output_path).resolve() != Path(args.out).resolve():
            log.warning("the session's save.output_path %s is replaced by --out %s", save.output_path, args.out)
        procs["save"] = (save.model_copy(update={"output_path": str(args.out)}) if save is not None
                         else SaveProcessorConfig(output_path=str(args.out)))
        session = session.model_copy(update={"calib_data": calib, "processor_cfg_map": procs})
        gm = run_session(model, session, progress=not args.quiet)
        return gm, session.quant_processor, False
    if args.disable_level != "L0":
        cfg = fxquant.QuantConfig.for_scheme(args.scheme, group_size=args.group_size)
        cal = fxquant.Calibrator(model, cfg, calib_data=calib, disable_level=args.disable_level, mix_cfg=mix_cfg,
                                 progress=not args.quiet)
        cal.run()
        return cal.model, args.scheme, True
    options = fxquant.SchemeOptions(group_size=args.group_size, offset_in_rounding=args.format == "ascend")
    gm = fxquant.quantize(model, calib, args.scheme, mix_cfg, options=options, measure_layers=bool(args.report),
                          progress=not args.quiet)
    return gm, args.scheme, bool(args.report)


def _write(gm: Any, model: Any, tok: Any, out: Path, args: argparse.Namespace, scheme: str, calib: list) -> list[str]:
    if args.format == "ascend":
        from fxquant.formats.ascend_checkpoint import save_ascend

        files = [] if args.session else save_ascend(gm, model, out, default_scheme=scheme)
        if args.session:
            files = sorted(p.name for p in out.glob("quant_model_*"))
    else:
        from fxquant.formats.onnx_export import to_onnx_model, write_onnx
        from fxquant.passes import lower_to_qdq

        proto = to_onnx_model(CausalLMLogits(lower_to_qdq(gm)), (calib[0]["input_ids"],), {}, ["input_ids"])
        files = [write_onnx(proto, out / "model.onnx").name]
    save_tokenizer(tok, out)
    return files
