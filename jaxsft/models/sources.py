"""Checkpoint tensors under their Hugging Face names, read lazily one tensor at a time.

A `TensorSource` never materialises the whole model: `read` returns one tensor in HF layout
(possibly a memory map). `open_source` turns a local path into an HF config dict and a source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from safetensors import safe_open

from jaxsft.errors import UserError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@runtime_checkable
class TensorSource(Protocol):
    """HF-named tensors in HF layout (e.g. linear weights `[out, in]`)."""

    path: str

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A safetensors checkpoint, single-file or sharded with `model.safetensors.index.json`.

    Files are memory-mapped and opened on first use; headers alone give keys and shapes. `read`
    copies out one tensor, `read_slice` only the bytes of the slice. bfloat16 comes back as
    `ml_dtypes.bfloat16`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        root = Path(path)
        self.path = str(root)
        self._handles: dict[Path, Any] = {}
        self._file_keys: dict[Path, set[str]] = {}
        if root.is_file():
            self._files = dict.fromkeys(self._open(root).keys(), root)
        elif (index := root / SAFETENSORS_INDEX).is_file():
            self._files = _read_index(index)
        elif (single := root / SAFETENSORS_FILE).is_file():
            self._files = dict.fromkeys(self._open(single).keys(), single)
        else:
            raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {root}")

    @property
    def files(self) -> list[Path]:
        """The safetensors files holding the tensors, in key order."""
        return list(dict.fromkeys(self._files.values()))

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def read_slice(self, name: str, index: tuple[slice | int, ...] | slice | int) -> np.ndarray:
        """`tensor[index]` reading only the bytes it covers (e.g. one device shard)."""
        return self._slice(name)[index]

    def _slice(self, name: str) -> Any:
        return self._handle(name).get_slice(name)

    def _handle(self, name: str) -> Any:
        try:
            file = self._files[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        handle = self._open(file)
        if name not in self._file_keys[file]:
            raise KeyError(f"tensor {name!r} is listed in the index but missing from {file}")
        return handle

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="np")
            except Exception as e:  # SafetensorError, OSError: header or file unreadable
                raise UserError(f"cannot read safetensors file {file}: {e}") from e
            self._file_keys[file] = set(self._handles[file].keys())
        return self._handles[file]

    def __repr__(self) -> str:
        return f"SafetensorsSource({self.path!r}, files={len(self.files)}, tensors={len(self._files)})"


def _read_index(index: Path) -> dict[str, Path]:
    """Tensor name → shard path from a sharded checkpoint's index; every shard must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read safetensors index {index}: {e!r}") from e
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    for shard in dict.fromkeys(files.values()):
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index} is missing")
    return files


def open_source(path: str | os.PathLike[str]) -> tuple[dict[str, Any], TensorSource]:
    """(HF config dict, tensor source) for an HF model directory or a `.gguf` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from jaxsft.models.gguf import GGUFSource  # `gguf` imports mistral_common: ~1 s, only when needed

        source = GGUFSource(path)
        return dict(source.config), source
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        try:
            hf_config = json.loads(config.read_bytes().decode("utf-8"))
        except ValueError as e:  # invalid JSON or not UTF-8
            raise UserError(f"cannot parse {config}: {e}") from e
        return hf_config, SafetensorsSource(path)
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file: set --config.model.path to one")
    raise FileNotFoundError(f"no such model path: {path}")
