"""One process per row: the SmolLM2 protocol's arguments, the runner and the table it prints."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def add_protocol_arguments(ap: argparse.ArgumentParser) -> None:
    """--calib / --eval windows of 512 tokens, and the hidden --one ROW a row's process gets."""
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows of 512 tokens")
    ap.add_argument("--eval-text", choices=EVAL_TEXTS, default="docs",
                    help="held-out text: docs (the odd pydoc topics; calibration uses the even ones) or gpl3 "
                         "(the GPL-3 license, a second domain: at most 14 windows)")
    ap.add_argument("--one", help=argparse.SUPPRESS)


#: --eval-text choices
EVAL_TEXTS = ("docs", "gpl3")


def eval_windows(tok, eval_text: str, n: int) -> list:
    """The held-out windows (int64 [1, 512] each) of the chosen text."""
    from fxquant.real_models import license_text, text_corpus, token_windows

    if eval_text == "gpl3":
        return token_windows(tok, license_text("GPL-3"), min(n, 14), 512)
    return token_windows(tok, text_corpus("eval"), n, 512)


def run_rows(python: str, script: str, rows: list[str], args: argparse.Namespace) -> list[dict]:
    """Each row in its own `python script --one ROW` process: its JSON result ({"row", "ppl",
    "calib_s", "peak_rss_mb"}), or {"row", "error"} with the last line it wrote to stderr."""
    results = []
    for row in rows:
        cmd = [python, script, "--one", row, "--calib", str(args.calib), "--eval", str(args.eval),
               "--eval-text", args.eval_text]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {row}: failed ({reason})", file=sys.stderr)
            results.append({"row": row, "error": reason})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"  {row}: perplexity {r['ppl']:.3f}, calibration {r['calib_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return results


def print_table(first_column: str, rows: list[dict]) -> None:
    """Markdown table of the rows; the first row is the fp32 baseline."""
    base = rows[0]["ppl"]
    reloads = any("reloaded_ppl" in r for r in rows)  # rows that saved an Ascend checkpoint and reloaded it
    headers = [first_column, "perplexity", "vs fp32", "calibration s", "peak RSS MB"] + (["Ascend reload vs fp32"] if reloads else [])
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        if "error" in r:
            cells = [r["row"], f"failed: {r['error'][:80]}"] + [""] * (len(headers) - 2)
        else:
            cells = [r["row"], f"{r['ppl']:.3f}", f"{100.0 * (r['ppl'] / base - 1.0):+.2f}%", f"{r['calib_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}"]
            if reloads:
                cells.append(f"{100.0 * (r['reloaded_ppl'] / base - 1.0):+.2f}%" if "reloaded_ppl" in r else "")
        print("| " + " | ".join(cells) + " |")
