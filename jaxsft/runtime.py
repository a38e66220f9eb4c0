"""What every command needs from a config: the mesh, the model and the tokenizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxsft.models import sharding, sources

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    return models.from_pretrained(sources.locate(path or m.path), dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype),
                                  mesh=mesh, scan_layers=m.scan_layers, remat=m.remat)


def load_tokenizer(cfg: ml_collections.ConfigDict, path: str | None = None):
    from jaxsft import tokenization

    return tokenization.load_tokenizer(sources.locate(path or cfg.model.path).local)


def load(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, path: str | None = None):
    """(model, tokenizer) of `cfg.model` (or the checkpoint at `path`), checked to belong together."""
    from jaxsft import tokenization

    model, tokenizer = load_model(cfg, mesh, path), load_tokenizer(cfg, path)
    tokenization.check_vocab(tokenizer, model.cfg, path or cfg.model.path)
    return model, tokenizer
