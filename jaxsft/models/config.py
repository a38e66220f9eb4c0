"""One configuration for every decoder family, read from a Hugging Face `config.json`.

Families differ only by the switches below; `ModelConfig.from_hf` is the single place that knows how
each `model_type` spells them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxsft.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "phi", "phi3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' `rope_parameters`)."""

    theta: float = 10000.0
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary when < head_dim)
    type: str = "default"  # default | linear | llama3 | longrope
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Hashable: it is static under `jit`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    max_position_embeddings: int = 4096
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True  # gate/up/down (SwiGLU) or fc1/fc2
    parallel_block: bool = False  # phi: x + attn(ln(x)) + mlp(ln(x))
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    scan_layers: bool = False  # lax.scan over layers: faster compile, slower steady state
    remat: str = "none"  # none | full | dots: rematerialisation of each layer under autodiff
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
        """Parse an HF `config.json` dict read from `source`; raise `UserError` naming `source` and the key
        on an unsupported `model_type`, a missing key, a value of the wrong type or inconsistent shapes."""
        check_hf_config(hf, source)
        model_type = hf.get("model_type")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden // heads
        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=_rope(hf, head_dim, source),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=hf.get("hidden_act", "silu"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
        )
        if kw["rope"].rotary_dim % 2:
            raise UserError(f"{source}: rotary dims {kw['rope'].rotary_dim} (head_dim {head_dim} x "
                            "partial_rotary_factor) must be even; fix partial_rotary_factor")
        if model_type == "llama":
            kw.update(qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False),
                      mlp_bias=hf.get("mlp_bias", False))
        elif model_type == "qwen2":
            kw.update(qkv_bias=True)
        elif model_type == "qwen3":
            kw.update(qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False),
                      qk_norm=True)
        elif model_type == "phi":
            if hf.get("qk_layernorm"):
                raise UserError(f"{source}: phi with qk_layernorm=True is not supported")
            kw.update(norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5), gated_mlp=False,
                      parallel_block=True, qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True)
        elif model_type == "phi3":
            pass  # fused qkv / gate_up are split by the loader; the rest is llama-like
        kw.update(overrides)
        return cls(**kw)


# config.json keys every family needs, and the optional ones whose type is checked when present.
REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings")
OPTIONAL_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
OPTIONAL_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qk_layernorm")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_hf_config(hf: Any, source: str = "config.json") -> None:
    """Raise `UserError` naming `source` and the key when an HF config cannot describe a decoder we build:
    an unsupported model_type, a missing key, a value of the wrong type ("64" for 64), or shapes that do
    not agree (heads that do not divide hidden_size, kv heads that do not divide heads)."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object (config.json), got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{source}: unsupported model_type {model_type!r}; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    def bad(key: str, expected: str) -> UserError:
        value = hf[key]
        shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
        return UserError(f"{source}: {key} = {shown}: expected {expected}")

    for key in REQUIRED_INTS:
        if hf.get(key) is None:
            raise UserError(f"{source}: required key {key!r} is missing (an HF config.json of a "
                            f"{model_type} model has it)")
    for key in (*REQUIRED_INTS, *OPTIONAL_INTS):
        if hf.get(key) is not None and not (_is_int(hf[key]) and hf[key] > 0):
            raise bad(key, "a positive integer")
    for key in OPTIONAL_NUMBERS:
        value = hf.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise bad(key, "a positive number")
    for key in OPTIONAL_BOOLS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise bad(key, "true or false")
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = hf.get(key)
        ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            raise bad(key, "a token id" + (" or a list of them" if key == "eos_token_id" else "") + " (or null)")
        if key != "pad_token_id" and value is not None and any(i >= hf["vocab_size"] for i in ids):
            raise bad(key, f"ids below vocab_size ({hf['vocab_size']})")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if not hf.get("head_dim") and hidden % heads:
        raise UserError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                        "(and no head_dim is given)")
    if heads % kv_heads:
        raise UserError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise bad(key, "an object (or null)")
    partial = hf.get("partial_rotary_factor")
    if partial is not None and not (isinstance(partial, (int, float)) and not isinstance(partial, bool)
                                    and 0 < partial <= 1):
        raise bad("partial_rotary_factor", "a number in (0, 1]")


def _ids(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, list):
        return tuple(value) if len(value) > 1 else value[0]
    return value


def _rope(hf: dict[str, Any], head_dim: int, source: str = "config.json") -> RopeConfig:
    """Read rope settings from either transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` + `partial_rotary_factor` spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise UserError(f"{source}: unsupported rope type {kind!r}; supported: default, linear, llama3, longrope")
    original = merged.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    tup = lambda v: tuple(float(x) for x in v) if v is not None else None
    return RopeConfig(
        theta=float(theta),
        rotary_dim=int(head_dim * partial),
        type=kind,
        factor=merged.get("factor"),
        low_freq_factor=merged.get("low_freq_factor"),
        high_freq_factor=merged.get("high_freq_factor"),
        original_max_position_embeddings=original,
        short_factor=tup(merged.get("short_factor")),
        long_factor=tup(merged.get("long_factor")),
        attention_factor=merged.get("attention_factor"),
    )
