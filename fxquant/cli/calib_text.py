"""Calibration and evaluation text from a file, as token windows int64 [1, L]."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import UsageError

log = logging.getLogger(__name__)

TEXT_FORMATS = ("windows", "lines")


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`, or a UsageError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"text file {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"text file {str(p)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def text_windows(tokenizer, path: str | Path, seq_len: int, samples: int, fmt: str = "windows") -> list[torch.Tensor]:
    """Token windows from a text file.

    fmt "windows": the whole text cut into up to `samples` consecutive windows of `seq_len` tokens
    (fewer when the text is shorter; none is an error). fmt "lines": one document per non-empty
    line, each cut to at most `seq_len` tokens, the first `samples` lines.
    """
    if fmt not in TEXT_FORMATS:
        raise UsageError(f"unknown text format {fmt!r}; valid: {', '.join(TEXT_FORMATS)}")
    if seq_len < 2 or samples < 1:
        raise UsageError(f"--seq-len must be >= 2 and --samples >= 1, got {seq_len} and {samples}")
    text = read_text(path)
    if fmt == "lines":
        docs = [line for line in text.splitlines() if line.strip()][:samples]
        windows = [tokenizer(d, return_tensors="pt").input_ids[:, :seq_len] for d in docs]
        windows = [w for w in windows if w.shape[1] >= 2]
        if not windows:
            raise UsageError(f"{path}: no line of at least 2 tokens to use as a document")
        return windows
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise UsageError(f"{path} has {len(ids)} tokens: too short for one window of {seq_len} "
                         "(give a longer text or a smaller --seq-len)")
    if n < samples:
        log.warning("%s holds %d windows of %d tokens, fewer than the %d asked for", path, n, seq_len, samples)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]
