"""`fxquant inspect DIR`: what each layer of a saved checkpoint is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UsageError


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", parents=parents, help="list the layers of a saved checkpoint (Ascend folder or ONNX file)",
                       description="Print what each layer of a saved checkpoint is: its type, stored "
                                   "weight and quantization parameters.")
    p.add_argument("path", metavar="DIR", help="an Ascend checkpoint folder or a .onnx file (or a folder with one)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fxquant.inspection.checkpoint_table import inspect_saved

    if not Path(args.path).exists():
        raise UsageError(f"{args.path!r} does not exist")
    try:
        table = inspect_saved(args.path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(table.to_dicts(), indent=1) if args.json else table)
    return 0
