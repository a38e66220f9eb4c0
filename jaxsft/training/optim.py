"""AdamW with warmup + cosine decay, global-norm clipping, and weight decay on matrices only.

The learning rate is an input of the compiled train step, computed on the host for each step
(`schedule`): the program does not depend on a run's length, so one compilation serves every grid
cell (60 or 240 items, any number of epochs). `AdamW` (the other settings) is a frozen dataclass:
equal settings are an equal key of the compilation cache (`training.step`).

`train.mu_dtype` ("" = the params' dtype, or "bfloat16") stores the first moment in that dtype: with
float32 master weights it saves a quarter of the optimizer state (what lets Llama-3-8B fit v5e-8).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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


def schedule(t: ml_collections.ConfigDict, total_steps: int) -> Callable[[int], float]:
    """The learning rate of each step, on the host: linear warmup from 0 to the peak over
    `warmup_steps`, then cosine decay to 0 at `total_steps` (optax's `warmup_cosine_decay_schedule`)
    or constant."""
    if t.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {t.schedule!r}; choose cosine or constant")
    peak, warmup = peak_learning_rate(t), t.warmup_steps
    decay = max(total_steps, warmup + 1) - warmup

    def learning_rate(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        if t.schedule == "constant":
            return peak
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))

    return learning_rate


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Global-norm clipping (0: off), then AdamW with weight decay on matrices (`decay_mask`);
    called with a learning rate (a traced scalar inside the step) it is the optax transformation.
    The state does not depend on the learning rate: `init` takes none."""

    b1: float
    b2: float
    weight_decay: float
    max_grad_norm: float
    mu_dtype: str = ""  # "": the params' dtype

    def __call__(self, learning_rate: float | jax.Array) -> optax.GradientTransformation:
        clip = optax.clip_by_global_norm(self.max_grad_norm) if self.max_grad_norm > 0 else optax.identity()
        adamw = optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=1e-8, weight_decay=self.weight_decay,
                            mask=decay_mask, mu_dtype=jnp.dtype(self.mu_dtype) if self.mu_dtype else None)
        return optax.chain(clip, adamw)

    def init(self, params: nnx.State) -> optax.OptState:
        return self(0.0).init(params)


def optimizer(t: ml_collections.ConfigDict) -> AdamW:
    """The optimizer of `cfg.train` (its learning rate comes from `schedule`)."""
    return AdamW(b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay),
                 max_grad_norm=float(t.max_grad_norm), mu_dtype=t.get("mu_dtype") or "")
