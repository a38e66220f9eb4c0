"""GGUF checkpoints read as Hugging Face checkpoints.

`GGUFSource` presents the tensors of a llama.cpp GGUF file under their transformers names and
layouts, dequantised to float32 one tensor at a time; `gguf_hf_config` rebuilds the `config.json`
dict from the GGUF metadata. Each llama.cpp architecture is one `GGUFArch` entry in `ARCHITECTURES`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from jaxsft.errors import UserError

# Rows dequantised per step: bounds a read's scratch memory to a few MB beyond its output.
_CHUNK_ELEMENTS = 1 << 20

_TOKENIZER_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture maps onto a transformers `model_type`.

    `metadata` maps `<arch>.<key>` metadata keys (without the prefix) to HF config keys; when two
    map to the same HF key the first present wins. `tensors` and `block` map GGUF tensor stems
    (without `.weight` / `.bias`) to HF module paths, `block` ones under `model.layers.N`.
    `rope_rows` names the block stems whose rows llama.cpp permuted for its rotary layout, with
    the config key giving their head count. `flags` are config booleans true when a tensor exists.
    `ignored` are derived tensors with no HF counterpart, with the warning their presence warrants.
    `fused` names block stems llama.cpp stores as one fused q/k/v tensor where transformers keeps
    three, split by head counts. `shapes` read HF config keys off a tensor's HF-layout axis, over
    the metadata (which some converters write wrong or not at all). `partial_rotary`: the rotated
    dims (`rope.dimension_count`) are a fraction of the head, transformers' `partial_rotary_factor`.
    """

    model_type: str
    architectures: tuple[str, ...]
    metadata: Mapping[str, str]
    tensors: Mapping[str, str]
    block: Mapping[str, str]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rope_rows: Mapping[str, str] = dataclasses.field(default_factory=dict)
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    fused: Mapping[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)
    shapes: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    partial_rotary: bool = False


_METADATA = {  # keys convert_hf_to_gguf.py writes (those a file lacks are skipped)
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
}
# llama rotates whole heads; the other families' rope.dimension_count is read as partial rotary.
_LLAMA_METADATA = {**_METADATA, "rope.dimension_count": "head_dim"}

_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_ROPE_FREQS = {
    "rope_freqs": "llama.cpp's per-dimension rope frequency factors (llama3 rope scaling) "
    "have no config.json equivalent and are dropped, as transformers does",
}

# Only llama's converter permutes q/k rows (`LlamaModel.permute`); qwen2, qwen3, phi2 and phi3 are
# written in HF order. phi3 keeps transformers' fused qkv_proj / gate_up_proj as attn_qkv / ffn_up;
# phi2 files converted from microsoft's original layout carry a fused attn_qkv that HF splits.
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(
        model_type="llama",
        architectures=("LlamaForCausalLM",),
        metadata=_LLAMA_METADATA,
        tensors=_TENSORS,
        block=_BLOCK,
        defaults={"hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False},
        rope_rows={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
        flags={"attention_bias": "blk.0.attn_q.bias", "mlp_bias": "blk.0.ffn_up.bias"},
        ignored=_ROPE_FREQS,
    ),
    "qwen2": GGUFArch(
        model_type="qwen2",
        architectures=("Qwen2ForCausalLM",),
        metadata=_METADATA,
        tensors=_TENSORS,
        block=_BLOCK,
        defaults={"hidden_act": "silu", "rope_theta": 10000.0},
        ignored=_ROPE_FREQS,
    ),
    "qwen3": GGUFArch(
        model_type="qwen3",
        architectures=("Qwen3ForCausalLM",),
        metadata=_METADATA,
        tensors=_TENSORS,
        block={**_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
        defaults={"hidden_act": "silu", "rope_theta": 10000.0},
        flags={"attention_bias": "blk.0.attn_q.bias"},
        # head_dim is not hidden / heads in Qwen3 and older converters omit attention.key_length
        shapes={"head_dim": ("blk.0.attn_q_norm.weight", 0)},
        ignored=_ROPE_FREQS,
    ),
    "phi2": GGUFArch(
        model_type="phi",
        architectures=("PhiForCausalLM",),
        metadata={**_METADATA, "attention.layer_norm_epsilon": "layer_norm_eps"},
        tensors={"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm", "output": "lm_head"},
        block={
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.dense",
            "ffn_up": "mlp.fc1",
            "ffn_down": "mlp.fc2",
        },
        defaults={"hidden_act": "gelu_new", "rope_theta": 10000.0, "qk_layernorm": False},
        fused={"attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
        # the converter writes 4 * hidden_size as feed_forward_length whatever the checkpoint has
        shapes={"intermediate_size": ("blk.0.ffn_up.weight", 0)},
        partial_rotary=True,
    ),
    "phi3": GGUFArch(
        model_type="phi3",
        architectures=("Phi3ForCausalLM",),
        metadata={**_METADATA, "rope.scaling.original_context_length": "original_max_position_embeddings"},
        tensors=_TENSORS,
        block={**_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
        defaults={"hidden_act": "silu", "rope_theta": 10000.0},
        partial_rotary=True,
        # longrope's per-dimension factors: read into the config's rope_scaling by `gguf_hf_config`
        ignored={"rope_factors_long": None, "rope_factors_short": None},
    ),
}


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what `gguf.GGUFReader` reads
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def check_header(path: str | os.PathLike[str]) -> None:
    """Raise `UserError` naming the file when it is not a GGUF file we can read: too short for a
    header, another magic, an unsupported version."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if not GGUF_MAGIC.startswith(head[:4]):
        raise UserError(f"cannot read GGUF file {path}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r}); "
                        "point model.path at a .gguf checkpoint, an HF directory or a hub id")
    if len(head) < _HEADER_BYTES:
        raise UserError(f"cannot read GGUF file {path}: truncated ({len(head)} bytes, shorter than its {_HEADER_BYTES}-byte "
                        "header); download it again")
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS and int.from_bytes(head[4:8], "big") not in GGUF_VERSIONS:
        raise UserError(f"cannot read GGUF file {path}: GGUF version {version} is not supported (versions "
                        f"{', '.join(map(str, GGUF_VERSIONS))} are); convert it with a current llama.cpp")


def open_reader(path: str | os.PathLike[str]) -> GGUFReader:
    """A memory-mapped `GGUFReader`; an unreadable file raises an error naming it."""
    try:
        check_header(path)
        return GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such GGUF file: {path}") from None
    except (ValueError, IndexError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read GGUF file {path}: truncated or corrupt ({type(e).__name__}: {e}); "
                        "download it again") from e


def _architecture(reader: GGUFReader) -> tuple[str, GGUFArch]:
    """The file's `general.architecture` and its table entry; raise if unsupported."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {_path(reader)}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch, ARCHITECTURES[arch]


def gguf_hf_config(reader: GGUFReader | str | os.PathLike[str]) -> dict[str, Any]:
    """An HF `config.json`-style dict built from the GGUF metadata (float32 weights)."""
    if not isinstance(reader, GGUFReader):
        reader = open_reader(reader)
    name, arch = _architecture(reader)
    config: dict[str, Any] = {"model_type": arch.model_type, "architectures": list(arch.architectures)}
    for key, hf_key in arch.metadata.items():
        value = _field(reader, f"{name}.{key}")
        if value is not None and hf_key not in config:
            config[hf_key] = _scalar(value, f"{name}.{key}")
    for key, hf_key in _TOKENIZER_IDS.items():
        if (value := _field(reader, key)) is not None:
            config[hf_key] = value
    tensors = {t.name: t for t in reader.tensors}
    for key, (tensor, axis) in arch.shapes.items():
        if tensor in tensors:
            config[key] = int(tensors[tensor].shape[::-1][axis])
    if (scaling := _rope_scaling(reader, name, tensors)) is not None:
        config["rope_scaling"] = scaling
    if "vocab_size" not in config and "token_embd.weight" in tensors:
        config["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    rotary = _field(reader, f"{name}.rope.dimension_count")
    if arch.partial_rotary and rotary is not None:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        config["partial_rotary_factor"] = rotary / head_dim
    for key, tensor in arch.flags.items():
        config[key] = tensor in tensors
    for key, value in arch.defaults.items():
        config.setdefault(key, value)
    config["tie_word_embeddings"] = "output.weight" not in tensors
    config["torch_dtype"] = config["dtype"] = "float32"
    return config


class GGUFSource:
    """A GGUF file's tensors under HF names in HF layout, dequantised to float32 lazily.

    `read` dequantises one tensor, in row chunks written straight into the output (undoing
    llama.cpp's q/k row permutation on the way), so only that tensor is ever materialised;
    unquantised float32 tensors come back as read-only memory maps. A fused GGUF tensor that HF
    splits (phi2's attn_qkv) is one entry per HF name, each reading only its own rows.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self.reader = open_reader(path)
        self.architecture, arch = _architecture(self.reader)
        self.config = gguf_hf_config(self.reader)
        self._tensors: dict[str, _Entry] = {}
        for tensor in self.reader.tensors:
            mapped = _hf_name(arch, tensor.name)
            if mapped is None:
                continue
            hf_names, stem = mapped
            if stem in arch.fused:
                self._tensors.update(zip(hf_names, _qkv_rows(tensor, self.config)))
                continue
            heads = self.config[arch.rope_rows[stem]] if stem in arch.rope_rows else None
            self._tensors[hf_names[0]] = _Entry(tensor, heads)
        # The metadata (a tokenizer's worth of small objects) is no longer needed: free it before
        # the weights load.
        self.reader.fields.clear()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        tensor, _, rows = self._entry(name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    def read(self, name: str) -> np.ndarray:
        tensor, heads, rows = self._entry(name)
        shape = self.shape(name)
        data = tensor.data if rows is None else tensor.data.reshape(int(tensor.shape[-1]), -1)[rows]
        if tensor.tensor_type == GGMLQuantizationType.F32 and heads is None:
            return data.reshape(shape)
        n_rows = int(np.prod(shape[:-1]))
        data = data.reshape(n_rows, -1)
        step = max(1, _CHUNK_ELEMENTS // shape[-1])
        if heads is None and n_rows <= step:
            return _dequantize(data, tensor.tensor_type).reshape(shape)
        out = np.empty(shape, np.float32)
        dest = out.reshape(n_rows, shape[-1])
        order = None if heads is None else _llama_cpp_row_order(n_rows, heads, name)
        for start in range(0, n_rows, step):
            block = _dequantize(data[start : start + step], tensor.tensor_type).reshape(-1, shape[-1])
            dest[slice(start, start + step) if order is None else order[start : start + step]] = block
        return out

    def _entry(self, name: str) -> _Entry:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def __repr__(self) -> str:
        return f"GGUFSource({self.path!r}, architecture={self.architecture!r}, tensors={len(self._tensors)})"


class _Entry(NamedTuple):
    """A GGUF tensor behind one HF name: `heads` undoes llama.cpp's q/k row permutation, `rows`
    picks this HF tensor's leading-axis range out of a fused one."""

    tensor: ReaderTensor
    heads: int | None = None
    rows: slice | None = None


def _qkv_rows(tensor: ReaderTensor, config: Mapping[str, Any]) -> list[_Entry]:
    """The q, k and v entries of a fused qkv weight or bias: row ranges by head counts."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    sizes = [config["num_attention_heads"] * head_dim] + [config["num_key_value_heads"] * head_dim] * 2
    rows = int(tensor.shape[-1])
    if sum(sizes) != rows:
        raise ValueError(f"GGUF tensor {tensor.name}: {rows} rows do not split into q/k/v of {sizes} rows")
    starts = np.cumsum([0, *sizes]).tolist()
    return [_Entry(tensor, None, slice(lo, hi)) for lo, hi in zip(starts[:-1], starts[1:])]


def _llama_cpp_row_order(rows: int, heads: int, name: str) -> np.ndarray:
    """`order[r]` is the HF row stored at GGUF row r.

    llama.cpp's converter permutes q/k rows per head from HF's half-split rotary layout to
    interleaved pairs: `w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2)`; applying the
    same permutation to row indices gives where each stored row came from.
    """
    if rows % (2 * heads):
        raise ValueError(f"{name}: {rows} rows do not split into {heads} heads of even size")
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if data.dtype != np.uint8:  # F16 / F32 / F64 / integer types are stored unpacked
        return data.astype(np.float32)
    return dequantize(data, qtype)


def _hf_name(arch: GGUFArch, name: str) -> tuple[list[str], str] | None:
    """(HF names, GGUF stem) of a GGUF tensor name, three for a fused qkv; None for derived
    tensors HF does not keep."""
    if m := re.fullmatch(r"blk\.(\d+)\.(.+)\.(weight|bias)", name):
        layer, stem, kind = m.groups()
        table, fused, prefix = arch.block, arch.fused, f"model.layers.{layer}."
    elif m := re.fullmatch(r"(.+)\.(weight|bias)", name):
        stem, kind = m.groups()
        table, fused, prefix = arch.tensors, {}, ""
    else:
        table, fused, prefix, stem, kind = {}, {}, "", name, ""
    if stem in table:
        return [f"{prefix}{table[stem]}.{kind}"], stem
    if stem in fused:
        return [f"{prefix}{part}.{kind}" for part in fused[stem]], stem
    if stem in arch.ignored:
        if reason := arch.ignored[stem]:
            warnings.warn(f"GGUF tensor {name}: {reason}", stacklevel=3)
        return None
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in the {arch.model_type} table")


def _field(reader: GGUFReader, key: str) -> Any:
    """A metadata value (float32 values at their shortest decimal), or None when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    if field.types and field.types[-1] == GGUFValueType.FLOAT32:
        value = [_decimal(v) for v in value] if isinstance(value, list) else _decimal(value)
    return value


def _decimal(value: float) -> float:
    """float32 1e-5 reads back as 9.99999974e-06: its shortest repr recovers the decimal written."""
    return float(str(np.float32(value)))


def _scalar(value: Any, key: str) -> Any:
    """A per-layer array is accepted only when constant (one value for every layer)."""
    if not isinstance(value, list):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"GGUF metadata {key} varies per layer ({value}); not supported")
    return value[0]


def _rope_scaling(reader: GGUFReader, name: str, tensors: Mapping[str, ReaderTensor]) -> dict[str, Any] | None:
    """transformers' `rope_scaling` from the metadata, or for longrope (phi3) from the per-dimension
    factors llama.cpp stores as the `rope_factors_long` / `rope_factors_short` tensors."""
    kind = _field(reader, f"{name}.rope.scaling.type")
    factor = _field(reader, f"{name}.rope.scaling.factor")
    original = _field(reader, f"{name}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in tensors or kind == "longrope":
        factors = {}
        for key in ("long", "short"):
            if (tensor := tensors.get(f"rope_factors_{key}.weight")) is None:
                raise ValueError(f"longrope GGUF {_path(reader)} has no rope_factors_{key}.weight tensor")
            factors[f"{key}_factor"] = [_decimal(v) for v in _dequantize(tensor.data, tensor.tensor_type).ravel()]
        return {"rope_type": "longrope", **factors, "original_max_position_embeddings": original}
    if kind is None and (linear := _field(reader, f"{name}.rope.scale_linear")) is not None:
        kind, factor = "linear", linear
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _path(reader: GGUFReader) -> str:
    return str(getattr(reader.data, "filename", "<gguf>"))
