"""LoRA and QLoRA adapters on the decoder's projections, through qwix (`qwix.LoraProvider`).

`train.lora.targets` names projections of `models.decoder.Block`, which are named as in Llama's HF
checkpoints for every family: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Phi-2's
dense / fc1 / fc2 are o_proj / up_proj / down_proj; it has no gate_proj). Each targeted kernel W
[in, out] gets qwix's `kernel_lora_a` [in, rank] (he-uniform) and `kernel_lora_b` [rank, out] (zeros),
`nnx.LoRAParam`s: the layer computes x W + (alpha / rank) x A B, so a fresh adapter changes nothing.
With `quantize_base` (QLoRA) qwix also stores each targeted W as NF4 (`WithAux[QArray]`) and
computes on it.

Layers are stacked (`[num_layers, ...]`), while qwix creates adapters for the op it sees, one layer's.
`apply` therefore runs qwix's initialisation on each layer's slice, under its own `jit` (qwix then
finds each kernel as an input of the trace), and stacks what it created: adapters of shape
[layers, in, rank] with their logical axes (`layers`, `embed`, ...), sharded like the kernels.

Out of a run come the merged model (`merge`: W + alpha/rank A B, for QLoRA on the dequantized W that
training saw) and a PEFT adapter (`save_adapter`) for the HF base. Phi-3 fuses q/k/v into `qkv_proj`
and gate/up into `gate_up_proj`: there the targeted parts' adapters are written as one adapter of
rank `rank x parts` whose B is block-diagonal (PEFT's `rank_pattern` / `alpha_pattern`), which
computes exactly the same thing.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix
from flax import nnx

from jaxsft.models import sharding
from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import PROJECTIONS, Decoder
from jaxsft.models.loading import TABLES
from jaxsft.models.rope import rotary_embedding

BASE_QTYPE = "nf4"  # QLoRA's 4-bit NormalFloat
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def enabled(t: ml_collections.ConfigDict) -> bool:
    """Whether `cfg.train` trains adapters (rank > 0) instead of every weight."""
    return t.get("lora") is not None and t.lora.rank > 0


def settings(c: ml_collections.ConfigDict) -> tuple:
    """What the adapters of `cfg.train.lora` are made of: (rank, alpha, targets, quantize_base)."""
    return int(c.rank), float(c.alpha), tuple(c.targets), bool(c.quantize_base)


def provider(c: ml_collections.ConfigDict) -> qwix.LoraProvider:
    """The qwix provider of `cfg.train.lora`: one rule for every targeted projection."""
    return _provider(*settings(c))


def _provider(rank: int, alpha: float, targets: tuple[str, ...], quantize_base: bool) -> qwix.LoraProvider:
    return qwix.LoraProvider(module_path="|".join(targets), rank=rank, alpha=alpha,
                             weight_qtype=BASE_QTYPE if quantize_base else None)


@functools.lru_cache(maxsize=8)
def _adapter(lora_settings: tuple, cfg: ModelConfig, dtype: Any) -> Callable:
    """qwix's initialisation of one layer's adapters, jitted: one function per (adapter settings,
    architecture, dtype) in a process. Runs of the same settings then share its compilation and the
    adapted layer type it returns (qwix makes a new type per call, and a new type is a new program
    for every jit that takes the model, the train step included)."""
    lora_provider = _provider(*lora_settings)
    rope = rotary_embedding(cfg.rope, cfg.max_position_embeddings)

    @nnx.jit
    def adapt(block, key):  # the inputs are made inside: nothing traced is kept in the cache
        x = jnp.zeros((1, 1, cfg.hidden_size), dtype)  # one token through one layer creates the params
        layer_inputs = (rope, x, rope.cos_sin(jnp.zeros((1, 1), jnp.int32), 0), jnp.ones((1, 1, 1, 1), bool),
                        None, 0, 0)
        return qwix.apply_lora_to_model(block, lora_provider, *layer_inputs, rngs=nnx.Rngs(params=key))

    return adapt


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(v: nnx.Variable) -> tuple | None:
    return v.get_metadata().get("out_sharding")


def _layer_slice(v: nnx.Variable, i: int) -> nnx.Variable:
    """Layer i of a stacked variable, its logical axes without `layers`."""
    axes = _axes(v)
    return v.copy(v[...][i], out_sharding=axes[1:] if axes else axes)


def _storable(x: jax.Array, platform: str) -> jax.Array:
    """NF4 codes packed (uint4) on TPU only. CPU arrays cannot take the packed 4-bit layout that an
    ahead-of-time compiled step expects of its arguments, and GPUs are unchecked: there the codes are
    held as uint8 (qwix reads them either way)."""
    return x.astype(jnp.uint8) if x.dtype == jnp.uint4 and platform != "tpu" else x


def _stacked(layers: list[dict[tuple, nnx.Variable]], mesh: jax.sharding.Mesh | None) -> dict[tuple, nnx.Variable]:
    """Per-layer variables stacked on a leading `layers` axis, placed by their logical axes on `mesh`
    (by one jit: its outputs have the layouts a compiled step expects, packed uint4 included)."""
    first = layers[0]
    axes = {p: ("layers", *(_axes(v) or (None,) * v.ndim)) for p, v in first.items()}
    out_shardings = None if mesh is None else {
        p: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes[p], (len(layers), *v.shape), mesh))
        for p, v in first.items()}
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    values = _stacker(platform, None if out_shardings is None else tuple(out_shardings.items()))(
        {p: [layer[p][...] for layer in layers] for p in first})
    return {p: v.copy(values[p], out_sharding=axes[p]) for p, v in first.items()}


@functools.lru_cache(maxsize=8)
def _stacker(platform: str, out_shardings: tuple | None) -> Callable:
    """`_stacked`'s jitted stack, one per (platform, placement): shared by the runs of a process."""
    return jax.jit(lambda vs: {p: _storable(jnp.stack(v), platform) for p, v in vs.items()},
                   out_shardings=None if out_shardings is None else dict(out_shardings))


def apply(model: Decoder, c: ml_collections.ConfigDict, *, seed: int = 0,
          mesh: jax.sharding.Mesh | None = None) -> Decoder:
    """A copy of `model` whose `c.targets` projections carry fresh qwix adapters (and, with
    `c.quantize_base`, NF4 kernels); the other params are shared with `model`. Works on abstract
    models too (inside `nnx.eval_shape`)."""
    cfg = model.cfg
    present = [p for p in PROJECTIONS if getattr(model.layers, p, None) is not None]
    missing = sorted(set(c.targets) - set(present))
    if c.rank <= 0 or not c.targets or missing:
        raise ValueError(f"config.train.lora: rank {c.rank}, targets {tuple(c.targets)}: expected rank > 0 and "
                         f"targets among the {cfg.model_type} projections {', '.join(present)}")
    adapt = _adapter(settings(c), cfg, model.dtype)
    graphdef, stacked = nnx.split(model.layers)
    before = dict(nnx.to_flat_state(stacked))
    created, kept, adapted_graphdef = [], None, None
    key = jax.random.key(seed)
    for i in range(cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda v: _layer_slice(v, i), stacked, is_leaf=_is_var))
        adapted_graphdef, state = nnx.split(adapt(block, jax.random.fold_in(key, i)))
        flat = dict(nnx.to_flat_state(state))
        kept = [p for p in flat if p in before]  # QLoRA replaces targeted kernels: those are not kept
        created.append({p: v for p, v in flat.items() if p not in before})
    new = _stacked(created, mesh)
    out = nnx.clone(model)
    out.layers = nnx.merge(adapted_graphdef, nnx.from_flat_state({**{p: before[p] for p in kept}, **new}))
    return out


def split(model: Decoder) -> tuple[nnx.GraphDef, nnx.State, tuple[nnx.State, ...]]:
    """(graphdef, trainable params, frozen states): the adapters and the rest when the model has
    adapters, else every param and nothing frozen. `nnx.merge(graphdef, params, *frozen)` rebuilds it."""
    if nnx.state(model, nnx.LoRAParam):
        graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
        return graphdef, adapters, (frozen,)
    graphdef, params = nnx.split(model)
    return graphdef, params, ()


def _adapted(model: Decoder) -> dict[str, nnx.Module]:
    """The projections of `model.layers` that carry adapters, by name."""
    return {p: m for p in PROJECTIONS if (m := getattr(model.layers, p, None)) is not None
            and getattr(m, "kernel_lora_a", None) is not None}


def _base_kernel(module: nnx.Module) -> jax.Array:
    """The kernel a projection computes with: dequantized when the base is quantized."""
    kernel = module.kernel
    if isinstance(kernel, nnx.Variable):
        return kernel[...]
    return qwix.dequantize(kernel.value.array)  # QLoRA: WithAux[QArray]


def merge(model: Decoder, c: ml_collections.ConfigDict) -> Decoder:
    """The plain decoder that computes what `model` (with adapters) computes: each adapted kernel
    becomes W + alpha / rank * A B (W dequantized for QLoRA), on the kernel's sharding."""
    adapted = _adapted(model)
    if not adapted:
        return model
    plain = nnx.eval_shape(lambda: Decoder(model.cfg, dtype=model.dtype, param_dtype=model.embed[...].dtype,
                                           rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(plain)
    values = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v, nnx.Variable)}
    like = model.embed[...]
    mesh = like.sharding.mesh if isinstance(getattr(like, "sharding", None), jax.sharding.NamedSharding) else None
    scale = float(c.alpha) / c.rank
    for name, module in adapted.items():
        w = _base_kernel(module)
        delta = jnp.einsum("lir,lro->lio", module.kernel_lora_a[...], module.kernel_lora_b[...])
        values[("layers", name, "kernel")] = (w + scale * delta).astype(w.dtype)
    for path, var in nnx.to_flat_state(abstract):
        value = values[path]
        var.value = value if mesh is None else jax.device_put(value, sharding.variable_sharding(var, mesh))
    return nnx.merge(graphdef, abstract)


# -- PEFT export ---------------------------------------------------------------------------------------

def _hf_modules(model_type: str, targets: set[str]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """HF linear modules ({i}: layer) holding targeted projections: (module, [(projection, targeted)])
    with every part of a fused module, in its output order."""
    out = []
    for rule in TABLES[model_type]:
        parts = [t.split(".")[1] for t in rule.ours if t.startswith("layers.") and t.endswith("_proj.kernel")]
        if parts and len(parts) == len(rule.ours) and targets & set(parts):
            out.append((rule.hf.removesuffix(".weight"), [(p, p in targets) for p in parts]))
    return out


def adapter_tensors(model: Decoder, c: ml_collections.ConfigDict
                    ) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, float]]:
    """PEFT's tensors (`base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]) and
    the rank / alpha of each fused module whose rank differs from `c.rank`."""
    adapted = _adapted(model)
    host = {p: (sharding.host_array(m.kernel_lora_a[...]), sharding.host_array(m.kernel_lora_b[...]))
            for p, m in adapted.items()}
    tensors, ranks, alphas = {}, {}, {}
    for module, parts in _hf_modules(model.cfg.model_type, set(adapted)):
        sizes = [getattr(model.layers, p).kernel.shape[-1] for p, _ in parts]
        offsets = np.cumsum([0, *sizes])
        targeted = [k for k, (_, t) in enumerate(parts) if t]
        rank = c.rank * len(targeted)
        if rank != c.rank:
            leaf = module.rsplit(".", 1)[-1]
            ranks[leaf], alphas[leaf] = rank, float(c.alpha) * len(targeted)  # same alpha / rank
        for i in range(model.cfg.num_layers):
            a_parts, b = [], np.zeros((offsets[-1], rank), host[parts[targeted[0]][0]][1].dtype)
            for j, k in enumerate(targeted):
                a, b_part = host[parts[k][0]]
                a_parts.append(a[i].T)
                b[offsets[k]:offsets[k + 1], j * c.rank:(j + 1) * c.rank] = b_part[i].T
            name = f"base_model.model.{module.format(i=i)}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_parts, axis=0))
            tensors[f"{name}.lora_B.weight"] = b
    return tensors, ranks, alphas


def save_adapter(model: Decoder, c: ml_collections.ConfigDict, out_dir: str | os.PathLike, *,
                 base_model: str = "") -> pathlib.Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` into the local `out_dir`, which
    `peft.PeftModel.from_pretrained(<HF base model>, out_dir)` loads (`Workdir.publish` makes the
    directory appear whole, local or `gs://`). With QLoRA the adapters were
    trained on the NF4 base: on the full-precision base they compute slightly differently."""
    from safetensors.numpy import save_file

    tensors, ranks, alphas = adapter_tensors(model, c)
    out_dir = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None, r=c.rank,
        lora_alpha=float(c.alpha), lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False,
        target_modules=sorted({name.split(".")[-3] for name in tensors}), rank_pattern=ranks, alpha_pattern=alphas,
        init_lora_weights=True, inference_mode=True, modules_to_save=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir
