"""What every command needs from a config: the mesh, the model and the tokenizer; and a model's
weights parked in host memory while the devices need the room (`parked`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

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


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


class HostCopy:
    """The arrays of a pytree in this host's memory: each process keeps one copy of every distinct
    shard its devices hold (replicas are not duplicated), and `place` puts them back on the same
    devices with the same shardings, bit for bit. Works on every backend and across processes."""

    def __init__(self, tree: Any):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.leaves = []
        for x in leaves:
            shards = {_index_key(s.index): s.data for s in x.addressable_shards}
            host = jax.device_get(shards)  # one transfer for every shard of this array
            self.leaves.append((x.shape, x.sharding, {k: np.asarray(v) for k, v in host.items()}))

    def place(self) -> Any:
        """A new device copy of the tree."""
        return self.treedef.unflatten([
            jax.make_array_from_callback(shape, sharding, lambda index, host=host: host[_index_key(index)])
            for shape, sharding, host in self.leaves])


@contextlib.contextmanager
def parked(model: nnx.Module) -> Iterator[nnx.Module]:
    """`model`'s weights in host memory while inside, its device buffers freed: yields a device copy
    of it (the same values in new buffers, the caller's to consume, e.g. to donate to a train
    state). At exit `model` is placed back as it was, bit for bit. The devices never hold more than
    one copy: a run that fine-tunes every weight of a loaded base model needs no more device memory
    than one that loaded its own."""
    graphdef, state = nnx.split(model)
    host = HostCopy(state)
    for x in jax.tree.leaves(state):
        if not x.is_deleted():  # an array held twice is deleted once
            x.delete()
    del state
    try:
        yield nnx.merge(graphdef, host.place())
    finally:
        nnx.update(model, host.place())
