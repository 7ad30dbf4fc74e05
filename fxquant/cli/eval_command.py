"""`fxquant eval MODEL|DIR --ppl FILE`: perplexity of a float model or a saved quantized checkpoint."""

from __future__ import annotations

import argparse
import logging
import time

from .calib_text import TEXT_FORMATS, text_windows
from .model_source import DTYPES, is_checkpoint, load_checkpoint, resolve_model

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", parents=parents, help="perplexity of a float model or a saved checkpoint on a text file",
                       description="Perplexity of MODEL (float) or DIR (a checkpoint written by fxquant "
                                   "quantize --format ascend) on the windows of a text file.")
    p.add_argument("model", metavar="MODEL|DIR")
    p.add_argument("--ppl", required=True, metavar="FILE", help="evaluation text (UTF-8)")
    p.add_argument("--text-format", choices=TEXT_FORMATS, default="windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of a float MODEL (a checkpoint is rebuilt in the dtype it was made in)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fxquant.real_models import perplexity

    start = time.perf_counter()
    if is_checkpoint(args.model):
        model, tok, info = load_checkpoint(args.model)
        what = f"checkpoint {args.model} ({info.get('scheme', 'quantized')})"
    else:
        model, tok = resolve_model(args.model).load(args.dtype)
        what = f"{args.model} ({args.dtype})"
    windows = text_windows(tok, args.ppl, args.seq_len, args.samples, args.text_format)
    ppl = perplexity(model, windows)
    log.info("evaluated in %.1f s", time.perf_counter() - start)
    print(f"perplexity {ppl:.4f}: {what} on {len(windows)} windows of up to {args.seq_len} tokens of {args.ppl}")
    return 0
