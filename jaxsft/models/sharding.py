"""Logical axis names → mesh axes (`data`, `fsdp`, `tensor`), in one rules table."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Each logical axis shards over these mesh axes (None: replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("length", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes; -1 takes the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    known = int(np.prod([s for s in shape if s != -1]))
    shape = [len(devices) // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} does not use the "
                         f"{len(devices)} devices")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules=LOGICAL_RULES) -> PartitionSpec:
    """Partition spec of an array with these logical axes; a dim that the mesh axes do not divide,
    or a mesh axis already used by an earlier dim, stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None and shape is not None and axes:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[dim] % size:
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """A NamedSharding for every variable of an (abstract) model state."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: the leading axis over the data-parallel axes (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *(None,) * (ndim - 1)))


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value every process holds: each process places only its own shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, value.__getitem__)


def host_array(x: jax.Array) -> np.ndarray:
    """The whole value of `x` on this host, gathering shards held by other processes if needed."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
