"""The `fxquant` command: quantize, inspect, eval. Exit codes: 0 success, 2 bad input (a path,
name or value to fix; one line on stderr), 1 anything else (one line; --debug shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from . import eval_command, inspect_command, quantize_command

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    common = _OneLineParser(add_help=False)  # accepted before or after the command
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks on errors")
    parser = _OneLineParser(prog="fxquant", description="Post-training quantization of PyTorch models.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (quantize_command, inspect_command, eval_command):
        command.add_parser(sub, [common])
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from fxquant.errors import FxquantError

    args = build_parser().parse_args(argv)
    args.quiet, args.debug = getattr(args, "quiet", False), getattr(args, "debug", False)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")
        for noisy in ("torch", "transformers", "onnxscript", "torchao"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        _silence_progress_bars()
    try:
        return args.run(args)
    except (FxquantError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"fxquant {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (one line for scripts; --debug for the traceback)
        if args.debug:
            raise
        print(f"fxquant {args.command}: error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def _silence_progress_bars() -> None:
    """Other libraries' bars (weight loading, GGUF conversion) follow --quiet too: this process
    is the command's own, so it may set tqdm's switch for itself."""
    os.environ["TQDM_DISABLE"] = "1"
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def console_main() -> None:
    """Entry point of the `fxquant` console script."""
    sys.exit(main())
