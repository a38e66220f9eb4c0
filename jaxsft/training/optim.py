"""AdamW with warmup + cosine decay, global-norm clipping, and weight decay on matrices only.

`train.mu_dtype` ("" = the params' dtype, or "bfloat16") stores the first moment in that dtype: with
float32 master weights it saves a quarter of the optimizer state (what lets Llama-3-8B fit v5e-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx


def decays(var: nnx.Variable) -> bool:
    """Weight decay applies to matrices (embeddings, projections), never to norms or biases: read
    from the logical axes, a param decays when it has two axes besides `layers` and none is `norm`."""
    names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
    return "norm" not in names and sum(n != "layers" for n in names) >= 2


def decay_mask(params: nnx.State) -> nnx.State:
    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def peak_learning_rate(t: ml_collections.ConfigDict) -> float:
    """`t.learning_rate`, or `t.lora.learning_rate` when adapters are trained (LoRA wants a larger one)."""
    return t.lora.learning_rate if t.get("lora") is not None and t.lora.rank > 0 else t.learning_rate


def learning_rate(t: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak learning rate, then cosine decay to 0 (or constant)."""
    peak = peak_learning_rate(t)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, t.warmup_steps,
                                                  max(total_steps, t.warmup_steps + 1), end_value=0.0)
    if t.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, t.warmup_steps),
                                     optax.constant_schedule(peak)], [t.warmup_steps])
    raise ValueError(f"unknown schedule {t.schedule!r}; choose cosine or constant")


def optimizer(t: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `cfg.train` and its learning-rate schedule."""
    schedule = learning_rate(t, total_steps)
    clip = optax.clip_by_global_norm(t.max_grad_norm) if t.max_grad_norm > 0 else optax.identity()
    adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay, mask=decay_mask,
                        mu_dtype=jnp.dtype(t.mu_dtype) if t.get("mu_dtype") else None)
    return optax.chain(clip, adamw), schedule
