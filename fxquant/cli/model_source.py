"""What MODEL names on the command line (a shipped model, a GGUF file, a Hugging Face folder), and
how a saved checkpoint folder is loaded back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import written_atomically
from .errors import UsageError

#: shipped model name -> loader in fxquant.real_models
SHIPPED_MODELS = {"smollm2": "load_smollm2", "gemma3": "load_gemma3"}
#: written beside a checkpoint by `fxquant quantize`: where its float model came from
SOURCE_FILE = "fxquant_source.json"


@dataclass(frozen=True)
class ModelSource:
    """kind: "shipped" (ref is a SHIPPED_MODELS name), "gguf" or "hf" (ref is an absolute path)."""

    kind: str
    ref: str

    def load(self, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
        """(float causal LM in eval mode, in `dtype`, one of DTYPES; tokenizer)."""
        from fxquant import real_models

        dtype = getattr(torch, dtype)
        if self.kind == "shipped":
            return getattr(real_models, SHIPPED_MODELS[self.ref])(dtype)
        if self.kind == "gguf":
            return real_models.load_gguf_causal_lm(Path(self.ref), dtype)
        return real_models.load_hf_causal_lm(self.ref, dtype)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder holding an Ascend description file (fxquant quantize --format ascend)."""
    p = Path(path)
    return p.is_dir() and any(p.glob("quant_model_description*.json"))


def resolve_model(spec: str) -> ModelSource:
    """The float model MODEL names, or a UsageError listing what MODEL may be."""
    if spec.lower() in SHIPPED_MODELS:
        return ModelSource("shipped", spec.lower())
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("gguf", str(p.resolve()))
    if is_checkpoint(p):
        raise UsageError(f"{spec!r} is a quantized checkpoint; quantize its float model instead")
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource("hf", str(p.resolve()))
    what = "is not a .gguf file or a folder with config.json" if p.exists() else "does not exist"
    raise UsageError(f"model {spec!r} {what}; give a Hugging Face folder (with config.json), a .gguf file, "
                     f"or a shipped model name: {', '.join(SHIPPED_MODELS)}")


#: --dtype choices: the dtype a model is loaded (and quantized) in
DTYPES = ("float32", "bfloat16", "float16")


def write_source(folder: Path, source: ModelSource, extra: dict[str, Any]) -> None:
    """Record where the checkpoint's float model came from (and how it was made), atomically."""
    with written_atomically(folder / SOURCE_FILE) as tmp:
        tmp.write_text(json.dumps({"model": asdict(source), **extra}, indent=2))


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The tokenizer's files into `folder`, each complete before it gets its final name."""
    staging = folder / f".tokenizer.{os.getpid()}.tmp"
    staging.mkdir(exist_ok=True)
    try:
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            os.replace(f, folder / f.name)
    finally:
        for f in staging.glob("*"):
            f.unlink()
        staging.rmdir()


def load_checkpoint(folder: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model with Ascend layers loaded, tokenizer, recorded source info) of a checkpoint folder:
    the architecture from its config.json, every tensor from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fxquant.formats.ascend_checkpoint import load_ascend

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise UsageError(f"checkpoint {str(p)!r} has no config.json: cannot rebuild its architecture")
    info = json.loads((p / SOURCE_FILE).read_text()) if (p / SOURCE_FILE).is_file() else {}
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    dtype = getattr(torch, info.get("dtype", "float32"))  # the dtype the checkpoint was made in
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        if "model" not in info:
            raise UsageError(f"checkpoint {str(p)!r} holds no tokenizer and no {SOURCE_FILE}") from None
        tok = ModelSource(**info["model"]).load()[1]
    return load_ascend(model, p), tok, info
