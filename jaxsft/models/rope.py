"""Rotary position embeddings: default, linear, llama3 and longrope, with partial rotary.

Frequencies are computed in float32 exactly as transformers computes them, so positions map to the
same angles to the last bit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.config import RopeConfig


def _base_inv_freq(rope: RopeConfig) -> np.ndarray:
    dim = rope.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(rope.theta), exponent)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig) -> np.ndarray:
    inv_freq = _base_inv_freq(rope)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope_inv_freq(rope: RopeConfig, ext: tuple[float, ...]) -> np.ndarray:
    dim = rope.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.asarray(ext, np.float32) * np.power(np.float32(rope.theta), exponent))).astype(
        np.float32
    )


class RotaryEmbedding:
    """Angles for each position; `apply` rotates the first `rotary_dim` dims of each head."""

    def __init__(self, rope: RopeConfig, max_position_embeddings: int):
        self.rotary_dim = rope.rotary_dim
        self.scale = 1.0
        self.long_inv_freq = None
        self.original_max = rope.original_max_position_embeddings
        if rope.type == "default":
            self.inv_freq = _base_inv_freq(rope)
        elif rope.type == "linear":
            self.inv_freq = _base_inv_freq(rope) / np.float32(rope.factor)
        elif rope.type == "llama3":
            self.inv_freq = _llama3_inv_freq(rope)
        elif rope.type == "longrope":
            self.inv_freq = _longrope_inv_freq(rope, rope.short_factor)
            self.long_inv_freq = _longrope_inv_freq(rope, rope.long_factor)
            factor = rope.factor or max_position_embeddings / self.original_max
            if rope.attention_factor is not None:
                self.scale = rope.attention_factor
            elif factor > 1.0:
                self.scale = math.sqrt(1 + math.log(factor) / math.log(self.original_max))
        else:
            raise ValueError(f"unsupported rope type {rope.type!r}")

    def cos_sin(self, positions: jax.Array, to_come: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
        """cos, sin of shape [batch, length, rotary_dim // 2], float32.

        longrope, like transformers, uses its long factors for a sequence longer than the original
        context. The length counts the `to_come` tokens a KV cache still has room for, so a sequence
        decoded step by step rotates exactly as its full forward does.
        """
        inv_freq = jnp.asarray(self.inv_freq)
        if self.long_inv_freq is not None:
            length = jnp.max(positions, axis=-1, keepdims=True) + 1 + to_come
            longer = (length > self.original_max)[..., None]
            inv_freq = jnp.where(longer, jnp.asarray(self.long_inv_freq), inv_freq)
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        return jnp.cos(angles) * self.scale, jnp.sin(angles) * self.scale

    def apply(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Rotate x [batch, length, heads, head_dim] (rotate-half convention)."""
        d = self.rotary_dim
        rot, rest = x[..., :d], x[..., d:]
        x1, x2 = jnp.split(rot.astype(jnp.float32), 2, axis=-1)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
        return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


@functools.lru_cache(maxsize=None)
def rotary_embedding(rope: RopeConfig, max_position_embeddings: int) -> RotaryEmbedding:
    """The (cached) rotary embedding of a config: built once per distinct config."""
    return RotaryEmbedding(rope, max_position_embeddings)
