"""The one decoder for every family: Llama, Qwen2/3, Phi-2, Phi-3/4.

Layers are stored stacked on a leading `layers` axis (one param per role, shape [L, ...]) and run
either as an unrolled loop or under `lax.scan` (`ModelConfig.scan_layers`). Family differences are
switches in `ModelConfig`, never a copied layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.config import PROJECTIONS  # Block's projections, Llama's HF names whatever the family
from jaxsft.models.config import ModelConfig
from jaxsft.models.rope import RotaryEmbedding, rotary_embedding

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: Any,
           init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for `slots` positions; `valid` marks the filled, unpadded slots."""

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array
    valid: jax.Array  # [batch, slots] bool
    index: jax.Array  # int32 scalar: next slot to write


class Norm(nnx.Module):
    """RMSNorm, or LayerNorm with bias, computed in float32 like transformers."""

    def __init__(self, cfg: ModelConfig, dim: int, lead: tuple[int, ...], rngs: nnx.Rngs, dtype: Any):
        names = ("layers",) * len(lead) + ("norm",)
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _param(rngs, (*lead, dim), names, dtype, "ones")
        self.bias = _param(rngs, (*lead, dim), names, dtype, "zeros") if cfg.norm == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "layer":
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + self.eps)
        if self.bias is None:  # transformers' RMSNorm casts before scaling
            return self.scale[...].astype(x.dtype) * h.astype(x.dtype)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


class Dense(nnx.Module):
    """One projection `x @ kernel (+ bias)`, stacked over layers like every Block param. Its own module
    so that adapters (`jaxsft.training.lora`, qwix) can target it by name; `jax.lax.dot_general` is
    called directly, where qwix intercepts it."""

    def __init__(self, rngs: nnx.Rngs, lead: tuple[int, ...], shape: tuple[int, int], names: tuple[str, str],
                 param_dtype: Any, bias: bool):
        layers = ("layers",) * len(lead)
        self.kernel = _param(rngs, lead + shape, layers + names, param_dtype)
        self.bias = _param(rngs, lead + shape[1:], layers + names[1:], param_dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.dot_general(x, jnp.asarray(self.kernel, x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        y = y.astype(x.dtype)  # an adapter's float32 delta leaves the compute dtype unchanged
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Block(nnx.Module):
    """Parameters of all layers, stacked: every array has a leading [num_layers] axis. Called on one
    layer's slice of them (see `Decoder.hidden_states`), it is that decoder layer.

    Projections are named as in Llama's HF checkpoints (q_proj ... down_proj) for every family;
    `loading.TABLES` maps each family's HF names onto them.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype: Any):
        L, E, F = (cfg.num_layers,), cfg.hidden_size, cfg.intermediate_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        dense = lambda shape, names, bias: Dense(rngs, L, shape, names, param_dtype, bias)
        self.cfg = cfg
        self.attn_norm = Norm(cfg, E, L, rngs, param_dtype)
        self.mlp_norm = None if cfg.parallel_block else Norm(cfg, E, L, rngs, param_dtype)
        self.q_proj = dense((E, q_dim), ("embed", "heads"), cfg.qkv_bias)
        self.k_proj = dense((E, kv_dim), ("embed", "heads"), cfg.qkv_bias)
        self.v_proj = dense((E, kv_dim), ("embed", "heads"), cfg.qkv_bias)
        self.o_proj = dense((q_dim, E), ("heads", "embed"), cfg.o_bias)
        qk_cfg = cfg.replace(norm="rms")
        self.q_norm = Norm(qk_cfg, cfg.head_dim, L, rngs, param_dtype) if cfg.qk_norm else None
        self.k_norm = Norm(qk_cfg, cfg.head_dim, L, rngs, param_dtype) if cfg.qk_norm else None
        self.gate_proj = dense((E, F), ("embed", "mlp"), cfg.mlp_bias) if cfg.gated_mlp else None
        self.up_proj = dense((E, F), ("embed", "mlp"), cfg.mlp_bias)
        self.down_proj = dense((F, E), ("mlp", "embed"), cfg.mlp_bias)

    def __call__(self, rope: RotaryEmbedding, x: jax.Array, cos_sin: tuple, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None, i: jax.Array | int, start: jax.Array | int):
        """Decoder layer `i` on x [B, T, E]; `self` holds its (unstacked) params, `kv` every layer's cache."""
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, *cos_sin), rope.apply(k, *cos_sin)
        if kv is not None:  # write only the new keys/values into layer i's slots, attend over all slots
            kv = tuple(jax.lax.dynamic_update_slice(c, n[None].astype(c.dtype), (i, 0, start, 0, 0))
                       for c, n in zip(kv, (k, v)))
            k, v = (jax.lax.dynamic_index_in_dim(c, i, keepdims=False) for c in kv)
        attn = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
        out = self.o_proj(attn.reshape(B, T, -1))
        if cfg.parallel_block:
            return x + out + self.mlp(h), kv
        x = x + out
        return x + self.mlp(self.mlp_norm(x)), kv

    def mlp(self, h: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.cfg.activation]
        if self.cfg.gated_mlp:
            return self.down_proj(act(self.gate_proj(h)) * self.up_proj(h))
        return self.down_proj(act(self.up_proj(h)))


class Decoder(nnx.Module):
    """Decoder-only LM. `model(input_ids, attention_mask)` gives logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.activation!r}; supported: {sorted(_ACTIVATIONS)}")
        self.cfg, self.dtype = cfg, dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = Block(cfg, rngs, param_dtype)
        self.final_norm = Norm(cfg, cfg.hidden_size, (), rngs, param_dtype)
        self.lm_head = None if cfg.tie_embeddings else _param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        self.lm_head_bias = (_param(rngs, (cfg.vocab_size,), ("vocab",), param_dtype, "zeros")
                             if cfg.lm_head_bias else None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        hidden, _ = self.hidden_states(input_ids, attention_mask)
        return self.unembed(hidden)

    def init_cache(self, batch: int, slots: int, dtype: Any = None) -> KVCache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, dtype or self.dtype)
        return KVCache(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      cache: KVCache | None = None, *, positions: jax.Array | None = None,
                      attend: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, E], and the updated cache when one is given.

        Positions count the unmasked tokens before each token (over the cache too), so left padding
        leaves real tokens unchanged. With a cache, the T new tokens fill slots [index, index + T).
        Packed rows (no cache) give their own `positions` [B, T] and `attend` [B, T, T]: which keys
        each query sees (several sequences in one row, each attending to its own tokens).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if attend is not None and cache is not None:
            raise ValueError("packed rows (attend) take no KV cache")
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            key_valid, offset, start = mask, jnp.zeros((B, 1), jnp.int32), 0
        else:
            start = cache.index
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, start, axis=1)
            offset = cache.valid.sum(-1, keepdims=True, dtype=jnp.int32)
        if positions is None:
            positions = offset + jnp.maximum(jnp.cumsum(mask, -1, dtype=jnp.int32) - 1, 0)
        query_slot = start + jnp.arange(T)
        causal = jnp.arange(key_valid.shape[1])[None, :] <= query_slot[:, None]  # [T, S]
        attn_mask = (causal[None] & key_valid[:, None, :] if attend is None else attend)[:, None]  # [B, 1, T, S]
        rope = rotary_embedding(cfg.rope, cfg.max_position_embeddings)
        cos_sin = rope.cos_sin(positions, key_valid.shape[1] - (start + T))

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, scanned):
            x, kv = carry
            params, i = scanned
            return nnx.merge(graphdef, params)(rope, x, cos_sin, attn_mask, kv, i, start), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        carry = (x, None if cache is None else (cache.k, cache.v))
        if cfg.scan_layers:
            carry, _ = jax.lax.scan(body, carry, (stacked, jnp.arange(cfg.num_layers)))
        else:
            for i in range(cfg.num_layers):
                carry, _ = body(carry, (jax.tree.map(lambda a: a[i], stacked), i))
        x, kvs = carry
        x = self.final_norm(x)
        if cache is not None:
            cache = KVCache(kvs[0], kvs[1], key_valid, start + T)
        return x, cache

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Logits for hidden states of any leading shape; apply only where logits are needed."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = hidden @ w.astype(hidden.dtype)
        return logits if self.lm_head_bias is None else logits + self.lm_head_bias[...].astype(hidden.dtype)
