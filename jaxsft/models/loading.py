"""Checkpoints in and out: per-family tables from Hugging Face tensor names to our params.

`from_pretrained` streams one tensor at a time from a `TensorSource` straight onto its
`NamedSharding`; `save_pretrained` writes an HF directory that transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxsft.errors import UserError
from jaxsft.models import sharding as shd
from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import Decoder
from jaxsft.models.sources import ModelFiles, TensorSource, locate, open_source


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor `hf` ({i}: layer index) → our param(s). Several targets: a fused HF tensor, split
    along its first axis. `linear`: HF stores [out, in], we store [in, out]."""

    hf: str
    ours: tuple[str, ...]
    linear: bool = False


def _r(hf: str, *ours: str, linear: bool = False) -> Rule:
    return Rule(hf, ours, linear)


_L = "model.layers.{i}."
_ATTN = [_r(_L + f"self_attn.{n}_proj.{p}", f"layers.{n}_proj.{'kernel' if p == 'weight' else p}", linear=p == "weight")
         for n in "qkvo" for p in ("weight", "bias")]
_NORMS = [
    _r("model.embed_tokens.weight", "embed"),
    _r(_L + "input_layernorm.weight", "layers.attn_norm.scale"),
    _r(_L + "post_attention_layernorm.weight", "layers.mlp_norm.scale"),
    _r("model.norm.weight", "final_norm.scale"),
    _r("lm_head.weight", "lm_head", linear=True),
]
_GATED = [_r(_L + f"mlp.{n}_proj.{p}", f"layers.{n}_proj.{'kernel' if p == 'weight' else p}", linear=p == "weight")
          for n in ("gate", "up", "down") for p in ("weight", "bias")]
TABLES: dict[str, list[Rule]] = {
    "llama": _NORMS + _ATTN + _GATED,
    "qwen2": _NORMS + _ATTN + _GATED,
    "qwen3": _NORMS + _ATTN + _GATED + [
        _r(_L + "self_attn.q_norm.weight", "layers.q_norm.scale"),
        _r(_L + "self_attn.k_norm.weight", "layers.k_norm.scale"),
    ],
    "phi": [
        _r("model.embed_tokens.weight", "embed"),
        _r(_L + "input_layernorm.weight", "layers.attn_norm.scale"),
        _r(_L + "input_layernorm.bias", "layers.attn_norm.bias"),
        *[_r(_L + f"self_attn.{n}_proj.weight", f"layers.{n}_proj.kernel", linear=True) for n in "qkv"],
        *[_r(_L + f"self_attn.{n}_proj.bias", f"layers.{n}_proj.bias") for n in "qkv"],
        _r(_L + "self_attn.dense.weight", "layers.o_proj.kernel", linear=True),
        _r(_L + "self_attn.dense.bias", "layers.o_proj.bias"),
        _r(_L + "mlp.fc1.weight", "layers.up_proj.kernel", linear=True),
        _r(_L + "mlp.fc1.bias", "layers.up_proj.bias"),
        _r(_L + "mlp.fc2.weight", "layers.down_proj.kernel", linear=True),
        _r(_L + "mlp.fc2.bias", "layers.down_proj.bias"),
        _r("model.final_layernorm.weight", "final_norm.scale"),
        _r("model.final_layernorm.bias", "final_norm.bias"),
        _r("lm_head.weight", "lm_head", linear=True),
        _r("lm_head.bias", "lm_head_bias"),
    ],
    "phi3": _NORMS + [
        _r(_L + "self_attn.qkv_proj.weight", "layers.q_proj.kernel", "layers.k_proj.kernel", "layers.v_proj.kernel",
           linear=True),
        _r(_L + "self_attn.o_proj.weight", "layers.o_proj.kernel", linear=True),
        _r(_L + "mlp.gate_up_proj.weight", "layers.gate_proj.kernel", "layers.up_proj.kernel", linear=True),
        _r(_L + "mlp.down_proj.weight", "layers.down_proj.kernel", linear=True),
    ],
}
# Buffers some checkpoints carry that are derived, not learned.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _plan(cfg: ModelConfig, params: dict[str, nnx.Variable]) -> list[tuple[Rule, int | None]]:
    """The rules (with layer index, None for global tensors) whose targets this model has."""
    plan = []
    for rule in TABLES[cfg.model_type]:
        if all(t in params for t in rule.ours):
            layers = range(cfg.num_layers) if "{i}" in rule.hf else [None]
            plan.extend((rule, i) for i in layers)
    return plan


def _hf_name(rule: Rule, i: int | None) -> str:
    return rule.hf.format(i=i) if i is not None else rule.hf


def _hf_shape(rule: Rule, i: int | None, params: dict[str, nnx.Variable]) -> tuple[int, ...]:
    """The HF shape a rule expects: our per-layer shape, or [sum of outputs, input] for linears."""
    shapes = [params[t].shape[1:] if i is not None else params[t].shape for t in rule.ours]
    return (sum(s[1] for s in shapes), shapes[0][0]) if rule.linear else tuple(shapes[0])


def _to_ours(rule: Rule, hf_tensor: np.ndarray, params: dict[str, nnx.Variable]) -> dict[str, np.ndarray]:
    if len(rule.ours) == 1:
        return {rule.ours[0]: hf_tensor.T if rule.linear else hf_tensor}
    sizes = [params[t].shape[-1] for t in rule.ours]  # fused linears: split the HF output axis
    parts = np.split(hf_tensor, np.cumsum(sizes)[:-1], axis=0)
    return {t: p.T for t, p in zip(rule.ours, parts)}


def _read_part(source: TensorSource, rule: Rule, i: int | None, key: str, index: tuple[slice, ...],
               params: dict[str, nnx.Variable]) -> np.ndarray:
    """Our param `key`'s (one layer's) `index` block, reading only those bytes when the source can."""
    name = _hf_name(rule, i)
    if len(rule.ours) == 1 and hasattr(source, "read_slice"):
        part = source.read_slice(name, index[::-1] if rule.linear else index)
        return part.T if rule.linear else part
    return _to_ours(rule, source.read(name), params)[key][index]


def _check(cfg: ModelConfig, plan, params, source: TensorSource) -> None:
    """Missing, unexpected and mis-shaped tensors, all named in one error."""
    wanted = {_hf_name(r, i): (r, i) for r, i in plan}
    have = set(source.keys())
    missing = sorted(set(wanted) - have)
    unexpected = sorted(n for n in have - set(wanted)
                        if not _IGNORED.match(n) and not (cfg.tie_embeddings and n == "lm_head.weight"))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name in sorted(set(wanted) & have):
        expected, found = _hf_shape(*wanted[name], params), tuple(source.shape(name))
        if found != expected:
            problems.append(f"shape mismatch for {name}: expected {expected}, found {found}")
    if problems:
        raise UserError(f"checkpoint {source.path} does not fit model_type {cfg.model_type!r}: "
                         + "; ".join(problems))


def from_pretrained(path: str | os.PathLike | ModelFiles, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    mesh: Mesh | None = None, rules=shd.LOGICAL_RULES, **config_overrides: Any) -> Decoder:
    """Load an HF directory (safetensors, single or sharded), a `.gguf` file, or a hub id.

    Tensors stream from memory maps one by one onto their shardings (`mesh` or the first device);
    `config_overrides` set `ModelConfig` fields such as `scan_layers` or `remat`.
    """
    files = path if isinstance(path, ModelFiles) else locate(path)
    hf_config, source = open_source(files)
    where = files.local if files.gguf else files.local / "config.json"
    cfg = ModelConfig.from_hf(hf_config, source=os.fspath(where), **config_overrides)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = {_key(p): v for p, v in nnx.to_flat_state(state)}
    plan = _plan(cfg, params)
    _check(cfg, plan, params, source)
    sources: dict[str, list[tuple[Rule, int | None]]] = {}
    for rule, i in plan:
        for t in rule.ours:
            sources.setdefault(t, []).append((rule, i))
    default = SingleDeviceSharding(jax.devices()[0])

    def load(key: str, var: nnx.Variable) -> jax.Array:
        entries = sources[key]
        sharding = shd.variable_sharding(var, mesh, rules) if mesh is not None else default
        stacked = entries[0][1] is not None

        def read(index: tuple[slice, ...]) -> np.ndarray:
            if not stacked:
                (rule, i), = entries
                return _read_part(source, rule, i, key, index, params).astype(var.dtype, copy=False)
            picked = entries[index[0]]
            out = None
            for k, (rule, i) in enumerate(picked):  # fill one buffer: no list of layers to stack
                part = _read_part(source, rule, i, key, index[1:], params)
                if out is None:
                    out = np.empty((len(picked), *part.shape), var.dtype)
                out[k] = part
            return out

        return jax.make_array_from_callback(var.shape, sharding, read)

    missing_params = sorted(set(params) - set(sources))
    if missing_params:
        raise ValueError(f"no rule fills params {missing_params} for model_type {cfg.model_type!r}")
    loaded = {k: load(k, v) for k, v in params.items()}
    for path_, var in nnx.to_flat_state(state):
        var.value = loaded[_key(path_)]
    return nnx.merge(graphdef, state)


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, *, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
    """Write `config.json` + safetensors (sharded past `max_shard_bytes`) that transformers loads
    into the local directory `out_dir`, `config.json` last. Every process must call it (the params
    are gathered); process 0 writes. `Workdir.write_dir` publishes it atomically, local or `gs://`.
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    _, state = nnx.split(model)
    flat = {_key(p): v for p, v in nnx.to_flat_state(state)}
    params = {k: v for k, v in flat.items() if isinstance(v, nnx.Param)}
    plan = _plan(cfg, params)
    out_dir = pathlib.Path(out_dir)
    writer = jax.process_index() == 0  # every process gathers the params (a collective); one writes
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    files: list[list[str]] = []  # tensor names per written shard
    shard: dict[str, np.ndarray] = {}

    def flush() -> None:
        if writer and shard:
            save_file(shard, str(out_dir / f"shard-{len(files):05d}.safetensors"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()

    host, total = {}, 0
    for rule, i in plan:
        parts = []
        for t in rule.ours:
            if t not in host:
                host = {t: shd.host_array(params[t][...])}  # one param on the host at a time
            part = host[t][i] if i is not None else host[t]
            parts.append(part.T if rule.linear else part)
        tensor = np.ascontiguousarray(np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[_hf_name(rule, i)] = tensor
        total += tensor.nbytes
    flush()
    if not writer:
        return out_dir
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))])
    for k, name in enumerate(names):
        os.replace(out_dir / f"shard-{k:05d}.safetensors", out_dir / name)
    if len(files) > 1:
        weight_map = {tensor: name for name, tensors in zip(names, files) for tensor in tensors}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = dict(cfg.hf_config)
    dtype_name = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16",
                  np.dtype(np.float16): "float16"}[np.dtype(model.embed[...].dtype)]
    hf.update(dtype=dtype_name, tie_word_embeddings=cfg.tie_embeddings)
    hf.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    return out_dir
