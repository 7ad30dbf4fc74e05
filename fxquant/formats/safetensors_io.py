"""Atomic, optionally sharded safetensors folders (HF index layout)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic_files import PUBLISHED_MODE
from ..errors import FxquantError


class AtomicFolderWriter:
    """Collects files for `folder`, writing each to a temporary name; `commit()` renames them all.

    Nothing appears under a final name until every file is complete; on error (or without
    commit) the temporaries are removed and the folder is as it was.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tag = uuid.uuid4().hex[:8]
        self._pending: list[tuple[Path, Path]] = []
        self._obsolete: list[Path] = []

    def path_for(self, name: str) -> Path:
        """A temporary path for final file `name`, registered for commit."""
        if "/" in name or name.startswith("."):
            raise FxquantError(f"invalid file name {name!r}")
        tmp = self.folder / f".{name}.{self._tag}.tmp"
        self._pending.append((tmp, self.folder / name))
        return tmp

    def write_text(self, name: str, text: str) -> None:
        path = self.path_for(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def remove_on_commit(self, paths: list[Path]) -> None:
        """Files of the folder that commit() deletes once the new files are in place."""
        self._obsolete += paths

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.chmod(tmp, PUBLISHED_MODE)
            os.replace(tmp, final)
        for path in self._obsolete:
            path.unlink(missing_ok=True)
        self._pending, self._obsolete = [], []

    def abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending, self._obsolete = [], []

    def __enter__(self) -> AtomicFolderWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(writer: AtomicFolderWriter, tensors: dict[str, torch.Tensor], filename: str,
                      part_file_size_gb: float | None = None) -> list[str]:
    """Write `tensors` as `filename` or, with part_file_size_gb, as shards
    `<stem>-00001-of-0000N.safetensors` plus `<filename>.index.json`; returns the file names.

    Shared storage (tied weights) is cloned so every name is saved. A shard holds tensors in the
    given order until adding one more would pass the size (a single larger tensor gets its own).
    """
    save_fn = save_file
    if not filename.endswith(".safetensors"):
        raise FxquantError(f"safetensors file name must end with .safetensors, got {filename!r}")
    seen: set[int] = set()
    clean: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[name] = t
    if not part_file_size_gb:
        save_fn(clean, str(writer.path_for(filename)), metadata={"format": "pt"})
        return [filename]
    if part_file_size_gb <= 0:
        raise FxquantError(f"part_file_size must be > 0 (GB), got {part_file_size_gb}")
    limit = part_file_size_gb * (1 << 30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in clean.items():
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    stem = filename[: -len(".safetensors")]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_fn(shard, str(writer.path_for(shard_name)), metadata={"format": "pt"})
        names.append(shard_name)
        weight_map.update({k: shard_name for k in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in clean.values())}, "weight_map": weight_map}
    writer.write_text(f"{filename}.index.json", json.dumps(index, indent=2))
    return names + [f"{filename}.index.json"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; FxquantError naming the file when it is unreadable."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types (truncation, header)
        raise FxquantError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_safetensors(folder: str | os.PathLike, filename: str) -> dict[str, torch.Tensor]:
    """Tensors of `filename` in `folder`, following `<filename>.index.json` when sharded."""
    folder = Path(folder)
    index = folder / f"{filename}.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise FxquantError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(_load(folder / shard))
        missing = set(weight_map) - set(out)
        if missing:
            raise FxquantError(f"index {index.name} lists tensors no shard holds: {sorted(missing)[:5]}")
        return out
    path = folder / filename
    if not path.exists():
        raise FxquantError(f"no {filename} (nor {filename}.index.json) in {folder}")
    return _load(path)


def read_safetensors_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder` (index files followed; names must be unique)."""
    folder = Path(folder)
    indexed = sorted(p.name[: -len(".index.json")] for p in folder.glob("*.safetensors.index.json"))
    out: dict[str, torch.Tensor] = {}
    files = indexed or sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise FxquantError(f"no .safetensors files in {folder}")
    for name in files:
        part = read_safetensors(folder, name)
        clash = set(part) & set(out)
        if clash:
            raise FxquantError(f"tensor names saved twice in {folder}: {sorted(clash)[:5]}")
        out.update(part)
    return out
