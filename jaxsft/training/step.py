"""The train step: next-token loss on target tokens, gradient accumulation, one optimizer update.

The lm_head and log-softmax run at target positions only when `targets_per_row` is given (SFT
targets are the answer and EOS: a few of each row's `max_length` positions), so the [batch, length,
vocab] logits, the largest activation of a small model, never exist.

`compile_train_step` lowers and compiles it ahead of time for one [batch, length] shape with the
state and batch shardings of a mesh: a run never recompiles, and a batch of another shape is an error
instead of a silent second compilation. The learning rate is an input (the host computes it per step,
`optim.schedule`), so the program does not depend on a run's length or seed: compiled programs are
kept per (model structure, optimizer settings, shapes and shardings), and every grid cell of a
process after the first reuses them (`init_state` likewise).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft.models import sharding
from jaxsft.training.optim import AdamW

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")  # int32 [batch, length] each
Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates done
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2]: the run's key data, for stochastic layers (fold in the step)


def loss_sum(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, frozen: tuple[nnx.State, ...] = (),
             targets_per_row: int | None = None) -> jax.Array:
    """Summed cross-entropy of the target tokens: token t+1 is predicted at t and counts where
    `loss_mask[t + 1]` is set; logits in float32 whatever the compute dtype. `frozen`: the states
    that are not trained (the base model under LoRA), merged with `params`.

    With `targets_per_row` = K, only the hidden states of each row's first K target positions are
    unembedded ([batch, K, vocab] logits instead of [batch, length, vocab]): K must be at least the
    most target tokens of any row (`targets_per_row(loss_mask)`), else the extra ones are left out
    and counted in `dropped_targets`.
    """
    model = nnx.merge(graphdef, params, *frozen)
    hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    hidden, targets, mask = hidden[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:] > 0
    if targets_per_row is not None:
        at = jax.vmap(lambda m: jnp.nonzero(m, size=targets_per_row, fill_value=0)[0])(mask)  # [B, K]
        hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
        targets = jnp.take_along_axis(targets, at, axis=1)
        mask = jnp.arange(targets_per_row) < jnp.sum(mask, -1, keepdims=True)
    logits = model.unembed(hidden).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(mask, nll, 0.0))


def targets_per_row(loss_mask: np.ndarray, multiple: int = 8) -> int:
    """The static K of `loss_sum` for a dataset: its most target tokens in a row (the first token
    never is one), rounded up to `multiple` and at most the row length."""
    most = int(np.max(np.sum(np.asarray(loss_mask)[:, 1:] > 0, -1), initial=1))
    return min(-(-max(most, 1) // multiple) * multiple, np.shape(loss_mask)[1] - 1)


def dropped_targets(batch: Batch, targets_per_row: int | None) -> jax.Array:
    """Target tokens past the first `targets_per_row` of their row: 0 when K fits the data."""
    if targets_per_row is None:
        return jnp.zeros((), jnp.int32)
    return jnp.sum(jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:] > 0, -1) - targets_per_row, 0))


def loss_and_grads(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, accum: int = 1,
                   frozen: tuple[nnx.State, ...] = (), targets_per_row: int | None = None
                   ) -> tuple[jax.Array, nnx.State]:
    """Mean target-token loss over the whole batch and its gradient, summed over `accum` microbatches.

    Microbatch k takes rows k, k + accum, ...: a reshape that keeps each device's rows on it.
    """
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1).astype(jnp.float32)
    grad_fn = jax.value_and_grad(lambda p, b: loss_sum(p, graphdef, b, frozen, targets_per_row) / tokens)
    if accum == 1:
        return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(lambda acc, b: (jax.tree.map(jnp.add, acc, grad_fn(params, b)), None),
                                    zero, micro)
    return loss, grads


def train_step(state: TrainState, batch: Batch, frozen: tuple[nnx.State, ...], learning_rate: jax.Array, *,
               graphdef: nnx.GraphDef, optimizer: AdamW, accum: int, targets_per_row: int | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update at `learning_rate` (float32 []): the new state and the step's metrics."""
    loss, grads = loss_and_grads(state.params, graphdef, batch, accum, frozen, targets_per_row)
    updates, opt_state = optimizer(learning_rate).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   learning_rate=learning_rate)
    if targets_per_row is not None:
        metrics["dropped_targets"] = dropped_targets(batch, targets_per_row)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def shardings(tree, mesh: Mesh):
    """NamedShardings of a pytree whose params (and their optimizer moments) are nnx Variables:
    each from its logical axes, everything else (counters, keys) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: sharding.variable_sharding(x, mesh) if isinstance(x, nnx.Variable) else replicated,
                        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract(tree, tree_shardings):
    """ShapeDtypeStructs carrying the target shardings: what to compile for, and restore onto."""
    leaves, treedef = jax.tree.flatten(tree)  # a Variable's one child is its value: leaves pair up
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, jax.tree.leaves(tree_shardings), strict=True)])


def init_state(params: nnx.State, rng: jax.Array, *, optimizer: AdamW) -> TrainState:
    """Step 0: `params`, fresh optimizer moments and the run's key data `rng` (uint32 [2])."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def signature(tree, tree_shardings=None) -> Hashable:
    """What a program compiled for `tree` depends on: its structure, and each leaf's shape, dtype and
    sharding (`tree_shardings`, else the leaf's own)."""
    leaves, treedef = jax.tree.flatten(tree)
    placed = jax.tree.leaves(tree_shardings) if tree_shardings is not None else [
        getattr(x, "sharding", None) for x in leaves]
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), s) for x, s in zip(leaves, placed, strict=True))


_PROGRAMS: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
KEEP_PROGRAMS = 16  # compiled programs kept per process, the least recently used dropped first


def _program(key: Hashable, build: Callable[[], Any]) -> Any:
    """The program of `key`, built (compiled) on first use."""
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    program = _PROGRAMS[key] = build()
    while len(_PROGRAMS) > KEEP_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return program


def init_program(optimizer: AdamW, state: TrainState, mesh: Mesh) -> Callable[[nnx.State, jax.Array], TrainState]:
    """`init_state(params, rng)` jitted onto the shardings of `state` (shapes suffice), `params`
    donated; one per (optimizer, state layout) in a process."""
    state_sharding = shardings(state, mesh)
    key = ("init", optimizer, signature(state, state_sharding))
    return _program(key, lambda: jax.jit(functools.partial(init_state, optimizer=optimizer),
                                         out_shardings=state_sharding, donate_argnums=0))


def compile_train_step(graphdef: nnx.GraphDef, optimizer: AdamW, accum: int, state: TrainState, mesh: Mesh,
                       batch_shape: tuple[int, int], frozen: tuple[nnx.State, ...] = (),
                       targets_per_row: int | None = None
                       ) -> Callable[[TrainState, Batch, tuple, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch, frozen, learning_rate)` compiled for `batch_shape`, state sharded by
    its logical axes and donated; `frozen` (shapes suffice) sharded the same way, read only; the
    learning rate a replicated float32 []; logits only at the first `targets_per_row` target
    positions of each row when given. Compiled once per process for equal arguments (`_program`)."""
    state_sharding, frozen_sharding = shardings(state, mesh), shardings(frozen, mesh)
    batch_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    key = ("train_step", graphdef, optimizer, accum, tuple(batch_shape), targets_per_row,
           signature(state, state_sharding), signature(frozen, frozen_sharding), batch_sharding)

    def build():
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, accum=accum,
                                         targets_per_row=targets_per_row),
                       in_shardings=(state_sharding, batch_sharding, frozen_sharding, replicated),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
        batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sharding) for k in BATCH_KEYS}
        return step.lower(abstract(state, state_sharding), batch, abstract(frozen, frozen_sharding),
                          jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)).compile()

    return _program(key, build)
